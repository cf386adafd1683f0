"""Keyed Philox noise: known answers, CPU kernel == reference, batch/layout invariance, and normality."""

import pytest
import torch
from scipy import stats

import ddpm_fast as df
from ddpm_fast.reference.noise import keyed_normal, philox4x32_10
from tests.helpers import PHILOX_KNOWN_ANSWERS, needs_cpu


def _t(v):
    return torch.tensor([v], dtype=torch.int64)


@pytest.mark.parametrize("counter, key, expected", PHILOX_KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, expected):
    out = philox4x32_10([_t(c) for c in counter], key)
    assert tuple(w.item() for w in out) == expected


@needs_cpu
@pytest.mark.parametrize("shape", [(3, 3, 5, 7), (1, 1, 1, 1), (2, 13), (4, 3, 32, 32), (2, 5, 1, 1), (2, 300, 3, 3)])
@pytest.mark.parametrize("stream", [0, 1, 2])
def test_cpu_noise_equals_reference(shape, stream):
    t = torch.randint(0, 1000, (shape[0],))
    ref = keyed_normal(shape, 1234567890123, t, stream, sample_offset=5)
    out = df.ops.keyed_normal(shape, seed=1234567890123, t=t, stream=stream, sample_offset=5, backend="cpu")
    d = (out - ref).abs()
    print(f"{shape} stream {stream}: max err {d.max():.3g}, mean err {d.mean():.3g}")
    assert d.max() <= 1e-5 * max(1.0, ref.abs().max().item())


@needs_cpu
def test_channels_last_draws_the_same_logical_noise():
    shape = (2, 5, 7, 9)
    a = df.ops.keyed_normal(shape, seed=7, backend="cpu")
    b = df.ops.keyed_normal(shape, seed=7, backend="cpu", memory_format=torch.channels_last)
    assert b.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu)])
def test_noise_depends_on_global_index_not_batch(backend):
    big = df.ops.keyed_normal((8, 3, 4, 4), seed=11, backend=backend)
    part = df.ops.keyed_normal((3, 3, 4, 4), seed=11, sample_offset=4, backend=backend)
    assert torch.equal(big[4:7], part)
    assert not torch.equal(big[0], big[1])
    assert not torch.equal(big, df.ops.keyed_normal((8, 3, 4, 4), seed=12, backend=backend))
    other_stream = df.ops.keyed_normal((8, 3, 4, 4), seed=11, stream=0, backend=backend)
    assert not torch.equal(big, other_stream)


@needs_cpu
def test_noise_is_standard_normal():
    z = df.ops.keyed_normal((64, 4096), seed=2024, backend="cpu").flatten().double()
    ks = stats.kstest(z.numpy(), "norm")
    print(f"mean {z.mean():.4f}, std {z.std():.4f}, KS stat {ks.statistic:.5f}, p {ks.pvalue:.3f}")
    assert abs(z.mean()) < 5 / 512  # 5 sigma for 262144 samples
    assert abs(z.std() - 1) < 0.01
    assert ks.pvalue > 1e-3
    # consecutive elements (the z pairs of one Box-Muller draw) are uncorrelated
    corr = torch.corrcoef(torch.stack([z[0::2], z[1::2]]))[0, 1]
    assert abs(corr) < 0.02


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_noise_is_the_rounded_fp32_noise(dtype):
    a = df.ops.keyed_normal((2, 3, 9, 9), seed=3, dtype=dtype, backend="cpu")
    b = df.ops.keyed_normal((2, 3, 9, 9), seed=3, backend="cpu").to(dtype)
    assert a.dtype == dtype and torch.equal(a, b)
