"""ops.trace(): what served each op call, and require_fused failing where the reference served a fused path."""

import threading

import pytest
import torch

import ddpm_fast as df
from ddpm_fast import ops
from tests.helpers import needs_cpu

S = df.NoiseSchedule.linear(10, 1e-3, 0.2)
TINY = dict(ch=32, ch_mult=(1, 2), attn_resolutions=(8,), sample_size=16, num_res_blocks=1)


def _step(backend=None):
    x = torch.randn(2, 3, 4, 4)
    return ops.ddpm_step(x, torch.randn_like(x), 5, S, seed=1, backend=backend)


def test_each_call_is_recorded_with_its_backend_and_kernel():
    with ops.trace() as outer:
        _step("torch")
        with ops.trace() as inner:
            ops.group_norm_silu(torch.randn(2, 4, 3, 3), 2, None, None, backend="torch")
    assert [str(c) for c in outer] == ["ddpm_step torch/reference", "group_norm_silu torch/reference"]
    assert [c.op for c in inner] == ["group_norm_silu"]
    assert outer.reference() == list(outer) and outer.backends() == {"torch"}
    print(outer.summary())
    assert outer.summary() == "ddpm_step torch/reference x1, group_norm_silu torch/reference x1"
    with ops.trace() as after:
        pass
    assert not after and after.summary() == "no ddpm_fast op ran"
    _step("torch")  # no trace open: nothing kept anywhere
    assert len(outer) == 2


def test_require_fused_fails_on_the_reference_and_on_nothing():
    with ops.trace() as calls:
        _step("torch")
    with pytest.raises(ops.FusedPathError, match="sampler: expected every op on a fused backend, but ddpm_step torch"):
        calls.require_fused("sampler")
    with pytest.raises(ops.FusedPathError, match="no ddpm_fast op ran"):
        ops.Trace().require_fused("row")
    fused = ops.Trace([ops.Call("ddpm_step", "cpu", "native")])
    assert fused.require_fused("row", backend="cpu", ops=["ddpm_step"]) is fused
    with pytest.raises(ops.FusedPathError, match="on the triton backend"):
        fused.require_fused("row", backend="triton")
    with pytest.raises(ops.FusedPathError, match="expected attention to run"):
        fused.require_fused("row", ops=["attention", "ddpm_step"])


def test_calls_from_other_threads_are_recorded():
    with ops.trace() as calls:
        th = threading.Thread(target=_step, args=("torch",))
        th.start()
        th.join()
    assert [c.op for c in calls] == ["ddpm_step"]


@needs_cpu
def test_the_unet_on_the_cpu_backend_is_fused_end_to_end():
    model = df.UNet(**TINY).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode(), ops.trace() as calls:
        model(x, torch.tensor([3, 5]))
    print(calls.summary())
    calls.require_fused("U-Net", backend="cpu", ops=["conv2d", "linear", "group_norm_silu", "attention"])
    kernels = {c.kernel for c in calls if c.op == "conv2d"}
    # 3x3 convs with >= 16 channels in Winograd (F(2x2) or F(4x4) by ops._cpu.winograd_tile); the 3-channel ends
    # and 1x1s in oneDNN
    assert "onednn" in kernels and kernels - {"onednn"} and kernels - {"onednn"} <= {"winograd", "winograd4x4"}


@needs_cpu
def test_a_hidden_extension_makes_the_fused_unet_fail_loudly(monkeypatch):
    """Auto dispatch falls back to the reference quietly; the trace shows it and require_fused raises."""
    monkeypatch.setattr(ops._cpu, "unavailable", lambda: "hidden for this test")
    model = df.UNet(**TINY).eval()
    with torch.inference_mode(), ops.trace() as calls:
        model(torch.randn(1, 3, 16, 16), torch.tensor([3]))
    assert calls.backends() == {"torch"}
    with pytest.raises(ops.FusedPathError, match="U-Net: expected every op on the cpu backend"):
        calls.require_fused("U-Net", backend="cpu")


@needs_cpu
def test_training_runs_the_cpu_kernels_and_says_so():
    """Under autograd every op of the U-Net runs the cpu kernels and their backward where the extension is built (the
    convolutions' weight gradients in ATen's convolution_backward, the linear layers' weight gradients in the BLAS,
    labelled so); nothing runs the reference."""
    model = df.UNet(**TINY)
    with ops.trace() as calls:
        model(torch.randn(1, 3, 16, 16), torch.tensor([3])).sum().backward()
    fused = {str(c) for c in calls if c.fused}
    with_backward = {f"{op}{part} cpu/native" for op in ("group_norm_silu", "attention") for part in ("", "_backward")}
    backward = {"conv2d_backward cpu/winograd+aten", "conv2d_backward cpu/aten", "conv2d_backward cpu/gemm"}
    conv = {"conv2d cpu/winograd", "conv2d cpu/winograd4x4", "conv2d cpu/onednn"} | backward
    # the time embedding's first layer needs no dx: its backward is dW alone, in the BLAS
    linear = {"linear cpu/onednn", "linear_backward cpu/onednn+blas"}
    if not df.ops._cpu._linear_onednn():
        linear = {"linear cpu/blas", "linear_backward cpu/blas"}
    assert fused <= with_backward | conv | linear | {"linear_backward cpu/blas"}, fused
    assert fused >= with_backward | backward | linear | {"conv2d cpu/onednn"}, fused
    assert fused & {"conv2d cpu/winograd", "conv2d cpu/winograd4x4"}, fused  # the Winograd tile follows the threads
    assert not [str(c) for c in calls if not c.fused]


def test_cuda_attention_capability_rule():
    """The tensor-core kernel takes fp16/bf16 at head dims 64/128/256; fp32 or other head dims are refused (auto:
    Triton or the reference runs; by name: a TypeError naming q)."""
    from ddpm_fast.ops import _cuda

    def qkv(dtype, d):
        return {n: torch.zeros(1, 2, 8, d, dtype=dtype) for n in "qkv"}

    assert _cuda.refuses("attention", dtype=torch.float16, **qkv(torch.float16, 64)) is None
    assert _cuda.refuses("attention", dtype=torch.float32, **qkv(torch.float32, 64)).startswith("q: ")
    assert _cuda.refuses("attention", dtype=torch.bfloat16, **qkv(torch.bfloat16, 48)).startswith("q: ")


@needs_cpu
def test_why_not_fused_says_why_only_the_reference_would_run(monkeypatch):
    assert ops.why_not_fused("cpu") is None and ops.why_not_fused(torch.device("cpu"), "cpu") is None
    assert ops.why_not_fused("cpu", "torch") == "backend 'torch' is the reference"
    assert ops.why_not_fused("cpu", "cuda") is not None  # not built, no GPU, or CPU tensors
    assert ops.why_not_fused("meta") == "no fused backend for meta tensors"
    with pytest.raises(ValueError, match="^backend: expected one of"):
        ops.why_not_fused("cpu", "tpu")
    monkeypatch.setenv("DDPM_FAST_BACKEND", "torch")
    assert ops.why_not_fused("cpu") == "backend 'torch' is the reference"
    monkeypatch.delenv("DDPM_FAST_BACKEND")
    monkeypatch.setattr(ops._cpu, "unavailable", lambda: "hidden for this test")
    assert ops.why_not_fused("cpu") == "no fused backend for cpu tensors (cpu: hidden for this test)"
