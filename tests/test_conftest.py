"""tests/conftest.py: a session without the CPU extension fails at start, naming the extension and the opt-out,
unless DDPM_FAST_ALLOW_NO_EXT=1. The extension is hidden from a fresh process by an import hook (ddpm_fast._ext
then reports every build missing, as after a failed build)."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, cpu_extension_unbuildable

HIDDEN = """
import sys

class HideExtension:
    def find_spec(self, name, path=None, target=None):
        if name.startswith("ddpm_fast._C"):
            raise ImportError(name + " hidden by the test")

sys.meta_path.insert(0, HideExtension())
import pytest

code = pytest.main(["-q", "-p", "no:cacheprovider", "--collect-only", sys.argv[1]])
import ddpm_fast
print("cpu backend:", ddpm_fast.backends()["cpu"])
sys.exit(code)
"""


def _session_without_extension(**env):
    environ = {k: v for k, v in os.environ.items() if k != "DDPM_FAST_ALLOW_NO_EXT"}
    r = subprocess.run(
        [sys.executable, "-c", HIDDEN, os.path.join(ROOT, "tests", "test_schedule.py")],
        cwd=ROOT,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(r.returncode, r.stdout[-3000:], r.stderr[-3000:])
    return r.returncode, r.stdout + r.stderr


@pytest.mark.skipif(cpu_extension_unbuildable() is not None, reason=str(cpu_extension_unbuildable()))
def test_session_fails_without_the_cpu_extension():
    code, out = _session_without_extension()
    assert code != 0
    assert "ddpm_fast's CPU extension did not load" in out
    assert "hidden by the test" in out  # the loader's own reason is passed on
    assert "DDPM_FAST_ALLOW_NO_EXT=1" in out


def test_opt_out_runs_the_session_without_the_cpu_extension():
    code, out = _session_without_extension(DDPM_FAST_ALLOW_NO_EXT="1")
    assert code == 0
    assert "cpu backend: extension not built" in out  # the extension really was hidden
    assert "did not load" not in out
