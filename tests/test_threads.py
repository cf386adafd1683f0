"""ddpm_fast._threads.wait_policy: the OpenMP wait policy a benchmark record names."""

import pytest

from ddpm_fast import _threads


@pytest.mark.parametrize(
    "value, want",
    [(None, "default"), ("PASSIVE", "passive"), (" active ", "active"), ("spin", "default"), ("", "default")],
)
def test_wait_policy_reads_the_variable(value, want, monkeypatch):
    if value is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", value)
    assert _threads.wait_policy() == want
