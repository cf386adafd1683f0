"""conv3x3 (Winograd F(2x2, 3x3) on the CPU) against the reference F.conv2d, judged against float64 truth."""

import pytest
import torch
import torch.nn.functional as F

import ddpm_fast as df
from ddpm_fast import reference as ref
from tests.helpers import needs_cpu, run_python


def _case(N, C, K, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g)
    w = torch.randn(K, C, 3, 3, generator=g) / (3 * C**0.5)  # unit-variance outputs, as in a trained net
    b = torch.randn(K, generator=g)
    r = torch.randn(N, K, H, W, generator=g)
    return x, w, b, r


@needs_cpu
@pytest.mark.parametrize(
    "N, C, K, H, W",
    [
        (2, 16, 32, 8, 8),
        (1, 3, 5, 1, 1),
        (3, 7, 9, 5, 6),
        (2, 96, 40, 15, 15),
        (1, 128, 128, 32, 32),
        (2, 256, 256, 4, 4),
    ],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_matches_reference(N, C, K, H, W, layout, with_residual, tile):
    """F(2x2, 3x3) and F(4x4, 3x3) (tile 4: 6x6 patches, partial tiles at every edge of these shapes)."""
    x, w, b, r = _case(N, C, K, H, W)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    res = r if with_residual else None
    packed = df.ops.winograd_weight(w, tile=tile)
    assert packed.shape == ((tile + 2) ** 2, C, K)
    out = df.ops.conv3x3(x, w, b, res, packed=packed, backend="cpu")
    want = ref.conv3x3(x, w, b, res)
    exact = ref.conv3x3(x.double(), w.double(), b.double(), None if res is None else res.double())
    err, torch_err = (out.double() - exact).abs().max().item(), (want.double() - exact).abs().max().item()
    mean = (out.double() - exact).abs().mean().item()
    print(
        f"conv3x3 F({tile}x{tile}) {(N, C, K, H, W)} {layout}: max err {err:.3g} (mean {mean:.3g}) vs float64, "
        f"F.conv2d {torch_err:.3g}"
    )
    assert out.shape == want.shape and out.is_contiguous(memory_format=torch.channels_last)
    # fp32 tolerance of DESIGN.md with the reduction ops' atol (2e-5), against the float64 truth
    assert err <= 2e-5 + 1e-5 * exact.abs().max().item()
    assert (out - want).abs().max().item() <= 4e-5


@needs_cpu
@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize(
    "N, C, K, H, W", [(1, 40, 70, 4, 4), (1, 64, 256, 8, 8), (3, 16, 33, 6, 6), (2, 32, 96, 20, 20)]
)
@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_work_split_over_threads(threads, N, C, K, H, W, tile):
    """Fewer tile blocks than threads split the output channels into parts (32 channels a unit, the last part
    short, more threads than parts); more tiles split into equal blocks: every split gives the same result."""
    x, w, b, r = _case(N, C, K, H, W, seed=3)
    x = x.contiguous(memory_format=torch.channels_last)
    packed = df.ops.winograd_weight(w, tile=tile)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = df.ops.conv3x3(x, w, b, r, packed=packed, backend="cpu")
    finally:
        torch.set_num_threads(before)
    exact = ref.conv3x3(x.double(), w.double(), b.double(), r.double())
    err = (out.double() - exact).abs().max().item()
    print(f"conv3x3 F({tile}x{tile}) {(N, C, K, H, W)} on {threads} threads: max err {err:.3g} vs float64")
    assert err <= 2e-5 + 1e-5 * exact.abs().max().item()


@needs_cpu
def test_packed_weight_out_and_in_place_residual():
    x, w, b, r = _case(2, 16, 16, 9, 7)
    x = x.contiguous(memory_format=torch.channels_last)
    packed = df.ops.winograd_weight(w)
    assert packed.shape == (16, 16, 16)
    want = F.conv2d(x, w, b, padding=1) + r
    res = r.contiguous(memory_format=torch.channels_last)
    got = df.ops.conv3x3(x, w, b, res, packed=packed, out=res)  # out aliases the residual: read then written
    assert got is res and (got - want).abs().max().item() < 4e-5
    # out may not be x: a fresh buffer is used and copied
    y = x.clone()
    got = df.ops.conv3x3(y, w, b, packed=packed, out=y)
    assert got is y and (got - F.conv2d(x, w, b, padding=1)).abs().max().item() < 4e-5


def test_bad_input():
    x, w, b, r = _case(1, 4, 6, 5, 5)
    with pytest.raises(ValueError, match="weight: expected shape"):
        df.ops.conv3x3(x, w[:, :3], b)
    with pytest.raises(ValueError, match="weight: expected shape"):
        df.ops.conv3x3(x, torch.randn(6, 4, 5, 5), b)
    with pytest.raises(ValueError, match="bias: expected shape"):
        df.ops.conv3x3(x, w, b[:3])
    with pytest.raises(ValueError, match="residual"):
        df.ops.conv3x3(x, w, b, r[:, :3])
    with pytest.raises(TypeError, match="bias"):
        df.ops.conv3x3(x, w, b.double())
    with pytest.raises(ValueError, match="x: expected"):
        df.ops.conv3x3(x[0], w, b)
    if df.backends()["cpu"].startswith("available"):
        with pytest.raises(TypeError, match="float32"):
            df.ops.conv3x3(x.half(), w.half(), b.half(), backend="cpu")
        with pytest.raises(ValueError, match="packed"):
            df.ops.conv3x3(x, w, b, packed=torch.zeros(16, 4, 5), backend="cpu")
        with pytest.raises(ValueError, match="tile: expected 2"):
            df.ops.winograd_weight(w, tile=3)


@needs_cpu
def test_non_contiguous_input_and_auto_dispatch_of_other_dtypes():
    x, w, b, r = _case(2, 24, 16, 11, 13)
    xs = torch.randn(2, 48, 11, 26)[:, ::2, :, ::2]  # strided in channels and width
    out = df.ops.conv3x3(xs, w, b, r, backend="cpu")
    want = ref.conv3x3(xs, w, b, r)
    print(f"conv3x3 strided input: max err {(out - want).abs().max().item():.3g}")
    assert (out - want).abs().max().item() <= 4e-5
    # float64 and float16 have no Winograd kernel: auto runs the reference
    got = df.ops.conv3x3(x.double(), w.double(), b.double())
    assert torch.allclose(got, ref.conv3x3(x.double(), w.double(), b.double()))
    with df.ops.trace() as calls:
        got = df.ops.conv3x3(x.half(), w.half(), b.half())
    assert got.dtype == torch.float16 and [c.backend for c in calls] == ["torch"]


_GEMM_CHECK = """
import sys, torch, ddpm_fast as df
from ddpm_fast import _ext, reference as ref
assert _ext.gemm_library() == sys.argv[1], _ext.gemm_library()
assert sys.argv[1] + " GEMMs" in df.backends()["cpu"], df.backends()["cpu"]
g = torch.Generator().manual_seed(0)
for N, C, K, H, W in ((2, 96, 40, 15, 15), (3, 128, 256, 9, 7), (1, 16, 16, 1, 1)):
    x = torch.randn(N, C, H, W, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(K, C, 3, 3, generator=g) / (3 * C**0.5), torch.randn(K, generator=g)
    out = df.ops.conv3x3(x, w, b, backend="cpu").double()
    exact = ref.conv3x3(x.double(), w.double(), b.double())
    err = (out - exact).abs().max().item()
    print("conv3x3", (N, C, K, H, W), "max err vs float64", err)
    assert err <= 2e-5 + 1e-5 * exact.abs().max().item(), err
"""


@needs_cpu
@pytest.mark.parametrize("library", ["onednn", "blas"])
def test_each_gemm_library_matches_the_reference(library):
    """The Winograd products through oneDNN's brgemm (the default) and through the BLAS (DDPM_FAST_GEMM=blas),
    each in a fresh process (the choice is fixed per process), on shapes with partial tile blocks and two threads."""
    assert run_python(_GEMM_CHECK, library, DDPM_FAST_GEMM=library, OMP_NUM_THREADS="2") == 0


def test_gemm_variable_is_checked(monkeypatch):
    from ddpm_fast import _ext

    monkeypatch.setenv("DDPM_FAST_GEMM", "mkl")
    with pytest.raises(ValueError, match="DDPM_FAST_GEMM must be onednn or blas"):
        _ext._check_gemm_variable()


# bf16: the Winograd products in bf16 with fp32 accumulation where the CPU has AVX512-BF16 or AMX-BF16, else the
# fp32 kernel on converted tensors; both are checked here, the first only where the CPU can run it.
def _bf16_paths():
    from ddpm_fast.ops import _cpu

    isa = _cpu.bf16_products() if df.backends()["cpu"].startswith("available") else None
    why = "the CPU has no AVX512-BF16/AMX-BF16 (or oneDNN is off): no bf16 products to test"
    return [
        pytest.param("bf16_products", marks=pytest.mark.skipif(isa is None, reason=why)),
        "fp32_kernel",
    ]


def _use_path(path, monkeypatch):
    from ddpm_fast.ops import _cpu

    if path == "fp32_kernel":
        monkeypatch.setattr(_cpu, "bf16_products", lambda: None)
    return "winograd_bf16" if path == "bf16_products" else "winograd_fp32"


@needs_cpu
@pytest.mark.parametrize("path", _bf16_paths())
@pytest.mark.parametrize("N, C, K, H, W", [(1, 17, 33, 5, 7), (3, 130, 70, 9, 11), (1, 3, 5, 1, 1), (3, 64, 200, 4, 3)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_bf16_winograd_matches_float64(path, N, C, K, H, W, layout, with_residual, monkeypatch):
    """bf16 in and out. The truth is float64 on the bf16 inputs; the tolerance is DESIGN.md's bf16 rule: at most
    2x the error of PyTorch's own bf16 convolution (F.conv2d on the same bf16 tensors: its result rounded to bf16,
    |err| <= 2^-9 |y| from that rounding alone) plus 1e-2. The kernel rounds its transformed input V and weight U to
    bf16 (relative 2^-9 each, on sums of at most 4 inputs / 9 weights) and its result once; it accumulates in fp32."""
    kernel = _use_path(path, monkeypatch)
    x, w, b, r = (t.bfloat16() for t in _case(N, C, K, H, W))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    res = r if with_residual else None
    with df.ops.trace() as calls:
        out = df.ops.conv3x3(x, w, b, res, backend="cpu")
    assert [(c.backend, c.kernel) for c in calls] == [("cpu", kernel)]
    exact = F.conv2d(x.double(), w.double(), b.double(), padding=1) + (0 if res is None else res.double())
    torch_bf16 = F.conv2d(x, w, b, padding=1) + (0 if res is None else res)
    err = (out.double() - exact).abs().max().item()
    mean = (out.double() - exact).abs().mean().item()
    torch_err = (torch_bf16.double() - exact).abs().max().item()
    print(
        f"bf16 conv3x3 {path} {(N, C, K, H, W)} {layout}: max err {err:.3g} (mean {mean:.3g}), torch bf16 {torch_err:.3g}"
    )
    assert out.dtype == torch.bfloat16 and out.shape == exact.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert err <= 2 * torch_err + 1e-2


def _bf16_conv2d_paths():
    """ops.conv2d's three bf16 paths for 3x3 stride-1 layers (_cpu.bf16_conv3x3): oneDNN's direct convolution
    (chosen on AMX CPUs; oneDNN runs it on any CPU, so it is tested everywhere), Winograd with bf16 products (where
    the CPU has bf16 instructions) and the fp32 Winograd kernel on converted tensors."""
    return ["onednn", *_bf16_paths()]


def _use_conv2d_path(path, monkeypatch):
    from ddpm_fast.ops import _cpu

    kernel = path if path == "onednn" else _use_path(path, monkeypatch)
    monkeypatch.setattr(_cpu, "bf16_conv3x3", lambda: kernel)
    return kernel


@needs_cpu
@pytest.mark.parametrize("path", _bf16_conv2d_paths())
def test_bf16_conv2d_serves_the_unet_shapes_and_follows_the_weight(path, monkeypatch):
    """ops.conv2d in bf16: the 3x3 stride-1 layers by the path the CPU's bf16 instructions choose (a packed weight
    and fp32 bias kept in the Prepared, rebuilt when the weight changes), oneDNN for the others."""
    kernel = _use_conv2d_path(path, monkeypatch)
    x = torch.randn(2, 32, 8, 8).bfloat16().contiguous(memory_format=torch.channels_last)
    for k, s, p, want_kernel in ((3, 1, 1, kernel), (1, 1, 0, "onednn"), (3, 2, 1, "onednn")):
        w, b = (torch.randn(48, 32, k, k) / (k * 32**0.5)).bfloat16(), torch.randn(48).bfloat16()
        prepared = df.ops.Prepared()
        for scale in (1.0, 2.0):
            w.mul_(scale)  # in place: the second call must repack
            with df.ops.trace() as calls:
                got = df.ops.conv2d(x, w, b, stride=s, padding=p, prepared=prepared)
            exact = F.conv2d(x.double(), w.double(), b.double(), stride=s, padding=p)
            err = (got.double() - exact).abs().max().item()
            torch_err = (F.conv2d(x, w, b, stride=s, padding=p).double() - exact).abs().max().item()
            print(f"bf16 conv2d {path} k={k} stride={s} x{scale}: max err {err:.3g}, torch bf16 {torch_err:.3g}")
            assert [c.kernel for c in calls] == [want_kernel] and got.dtype == torch.bfloat16
            assert err <= 2 * torch_err + 1e-2


@needs_cpu
def test_bf16_conv3x3_kernel_follows_the_cpu():
    """The rule itself: AMX -> oneDNN's direct convolution, AVX512-BF16 alone -> Winograd's bf16 products, neither
    -> the fp32 kernel."""
    from ddpm_fast.ops import _cpu

    want = {"amx_bf16": "onednn", "avx512_bf16": "winograd_bf16", None: "winograd_fp32"}[_cpu.bf16_products()]
    assert _cpu.bf16_conv3x3() == want


@needs_cpu
def test_bf16_bad_input():
    x, w, b, r = (t.bfloat16() for t in _case(1, 4, 6, 5, 5))
    with pytest.raises(TypeError, match="weight"):
        df.ops.conv3x3(x, w.float(), b)  # mixed dtypes: named before any kernel runs
    with pytest.raises(TypeError, match="residual"):
        df.ops.conv3x3(x, w, b, r.float())
    with pytest.raises(TypeError, match="x"):
        df.ops.conv2d(x.float(), w, b, padding=1)
    with pytest.raises(TypeError, match="packed"):
        df.ops.conv3x3(x, w, b, packed=df.ops.winograd_weight(w.float()), backend="cpu")  # the fp32 transform
    with pytest.raises(ValueError, match="packed: expected winograd_weight_bf16"):
        df.ops.conv3x3(x, w, b, packed=df.ops.winograd_weight_bf16(w[:, :2].contiguous()), backend="cpu")
    packed = df.ops.winograd_weight_bf16(w)
    assert packed.shape == (16, 1, 2, 64, 2) and packed.dtype == torch.bfloat16
    got = df.ops.conv3x3(x, w, b, r, packed=packed, backend="cpu")
    exact = F.conv2d(x.double(), w.double(), b.double(), padding=1) + r.double()
    assert (got.double() - exact).abs().max().item() <= 2e-2
