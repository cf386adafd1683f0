import pytest
import torch

import ddpm_fast as df
from ddpm_fast.ops._registry import resolve
from tests.helpers import needs_cpu, run_python

S = df.NoiseSchedule.linear(10, 1e-3, 0.2)


def test_backends_report_every_backend_with_a_reason():
    report = df.backends()
    print(report)
    assert set(report) == {"torch", "cpu", "triton", "cuda"}
    assert report["torch"] == "available"
    if not torch.cuda.is_available():
        assert "no GPU" in report["cuda"]


@needs_cpu
def test_auto_picks_cpu_for_fused_ops_and_reference_for_grad_and_float64():
    dev = torch.device("cpu")
    assert resolve("ddpm_step", None, dev) == "cpu"
    assert resolve("ddpm_step", "auto", dev, needs_grad=True) == "torch"
    assert resolve("ddpm_step", None, dev, dtype=torch.float64) == "torch"
    assert resolve("group_norm_silu", None, dev) == "cpu"
    assert resolve("attention", None, dev) == "cpu"
    assert resolve("attention", None, dev, dtype=torch.float64) == "torch"


def test_named_backend_that_cannot_run_raises_why():
    with (
        pytest.raises(RuntimeError, match="cuda.*no GPU")
        if not torch.cuda.is_available()
        else pytest.raises(ValueError)
    ):
        df.ops.ddpm_step(torch.zeros(1, 3), torch.zeros(1, 3), 1, S, torch.zeros(1, 3), backend="cuda")


@needs_cpu
def test_env_override(monkeypatch):
    monkeypatch.setenv("DDPM_FAST_BACKEND", "torch")
    assert resolve("ddpm_step", None, torch.device("cpu")) == "torch"
    monkeypatch.setenv("DDPM_FAST_BACKEND", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            resolve("ddpm_step", None, torch.device("cpu"))


@needs_cpu
def test_ops_compose_with_torch_compile():
    """The fused ops are torch custom ops: dynamo traces them (fake tensors, functionalized mutation)."""
    x, m, z = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([5, 5])
    a = torch.empty_like(x)

    def step(x, m, z, out):
        torch.ops.ddpm_fast.ddpm_step(x, m, t, None, S.alphas_cumprod, None, z, 0, 0, 0, 0, True, 1.0, out, None)
        return out * 2

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(x, m, z, a)
    expected = 2 * df.ops.ddpm_step(x, m, 5, S, z, clip_sample=True)
    torch.testing.assert_close(got, expected)


def test_import_without_extension_explains(monkeypatch):
    from ddpm_fast import _ext

    monkeypatch.setattr(_ext, "_error", "extension not built (test)")
    assert "not built" in df.backends()["cpu"]
    with pytest.raises(RuntimeError, match="not built"):
        df.ops.ddpm_step(torch.zeros(1, 3), torch.zeros(1, 3), 1, S, torch.zeros(1, 3), backend="cpu")
    # auto falls back quietly to the reference
    assert df.ops.ddpm_step(torch.zeros(1, 3), torch.zeros(1, 3), 1, S, torch.zeros(1, 3)).shape == (1, 3)


_BUILD_CHECK = """
import sys, torch, ddpm_fast as df
from ddpm_fast import _ext
assert _ext.cpu_capability() == sys.argv[1], _ext.cpu_capability()
torch.manual_seed(0)
s = df.NoiseSchedule.linear()
x, m = torch.randn(3, 3, 9, 9), torch.randn(3, 3, 9, 9)
for dtype in (torch.float32, torch.bfloat16):
    a = df.ops.ddpm_step(x.to(dtype), m.to(dtype), 500, s, seed=1, clip_sample=True, backend="cpu").float()
    b = df.reference.ddpm_step(x, m, torch.full((3,), 500), s, seed=1, clip_sample=True)
    err = (a - b).abs().max().item()
    print("ddpm_step", dtype, err)
    assert err < (2e-5 if dtype == torch.float32 else 3e-2), err
h, w, bias, add = torch.randn(2, 96, 7, 5), torch.randn(96), torch.randn(96), torch.randn(2, 96)
for layout in (torch.contiguous_format, torch.channels_last):
    got = df.ops.group_norm_silu(h.contiguous(memory_format=layout), 32, w, bias, add=add, backend="cpu")
    ref = df.reference.group_norm_silu(h, 32, w, bias, add=add)
    err = (got - ref).abs().max().item()
    print("group_norm_silu", layout, err)
    assert err < 2e-5, err
for heads, n, d in ((1, 37, 40), (4, 70, 64), (2, 600, 24)):  # partial tiles and panels; two key blocks
    q, k, v, r = (torch.randn(2, heads, n, d) for _ in range(4))
    got = df.ops.attention(q, k, v, residual=r, backend="cpu")
    ref = df.reference.attention(q, k, v, residual=r)
    err = (got - ref).abs().max().item()
    print("attention", heads, n, d, err)
    assert err < 2e-5, err
torch.save(df.ops.keyed_normal((2, 3, 7, 9), seed=5), sys.argv[2])
"""


@needs_cpu
@pytest.mark.parametrize("build", ["default", "avx2", "avx512"])
def test_every_build_matches_the_reference(build, tmp_path):
    """Each ISA build the CPU can run (the one loaded here and the narrower ones other CPUs load) matches the
    reference, and draws the same keyed noise as the loaded build."""
    from ddpm_fast import _ext

    if build not in _ext.runnable_builds():
        pytest.skip(f"this CPU ({torch.backends.cpu.get_cpu_capability()}) cannot run the {build} build")
    noise = tmp_path / "noise.pt"
    assert run_python(_BUILD_CHECK, build, str(noise), DDPM_FAST_CPU_CAPABILITY=build) == 0
    err = (torch.load(noise) - df.ops.keyed_normal((2, 3, 7, 9), seed=5)).abs().max().item()
    print("keyed_normal vs the loaded build", err)
    assert err < 1e-5, err


def test_capability_override_is_checked(monkeypatch):
    from ddpm_fast import _ext

    monkeypatch.setenv("DDPM_FAST_CPU_CAPABILITY", "sse9")
    with pytest.raises(ValueError, match="DDPM_FAST_CPU_CAPABILITY"):
        _ext._candidates()
    monkeypatch.setenv("DDPM_FAST_CPU_CAPABILITY", "avx2")
    assert _ext._candidates()[-1] == "_C" and "_C_avx512" not in _ext._candidates()
