import pytest
import torch

import ddpm_fast as df
from tests.helpers import needs_cpu

S = df.NoiseSchedule.linear(40, 1e-4, 0.3)


class Dummy(torch.nn.Module):
    """diffusers' scheduler-test model: output = x * t / (t + 1), per sample."""

    in_channels, sample_size = 3, 8

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t):
        t = torch.as_tensor(t).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return self.scale * x * t / (t + 1)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu)])
def test_samples_depend_only_on_seed_and_global_index(backend):
    d = df.GaussianDiffusion(Dummy(), S, backend=backend, clip_sample=False)
    big = d.sample(8, seed=123, progress=False)
    assert torch.equal(big[:4], d.sample(4, seed=123, progress=False))
    assert torch.equal(big[5:7], d.sample(2, seed=123, sample_offset=5, progress=False))
    assert not torch.equal(big, d.sample(8, seed=124, progress=False))


@needs_cpu
@pytest.mark.parametrize("clip", [True, False])
def test_fused_chain_equals_reference_chain(clip):
    torch.manual_seed(0)
    model = df.UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), sample_size=8, num_groups=8).eval()
    runs = {
        b: df.GaussianDiffusion(model, S, backend=b, clip_sample=clip).sample(3, seed=9, progress=False)
        for b in ("torch", "cpu")
    }
    err = (runs["cpu"] - runs["torch"]).abs().max().item()
    bound = 1e-3 * max(1.0, runs["torch"].abs().max().item())
    print(f"chain clip={clip}: max err {err:.3g} (bound {bound:.3g})")
    assert err <= bound


def test_generator_path_is_reproducible_and_progress_bar(capsys):
    d = df.GaussianDiffusion(Dummy(), S)
    a = d.sample(2, generator=torch.Generator().manual_seed(1), progress=True)
    b = d.sample(2, generator=torch.Generator().manual_seed(1), progress=False)
    assert torch.equal(a, b)
    assert "sampling" in capsys.readouterr().err


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_loss_trains(prediction_type):
    torch.manual_seed(0)
    model = df.UNet(
        ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), sample_size=8, num_groups=4, dropout=0.0
    )
    d = df.GaussianDiffusion(model, S, prediction_type=prediction_type)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    loss = d.loss(x0, seed=0)
    loss.backward()
    assert loss.item() > 0 and all(p.grad is not None for p in model.parameters())


def test_loss_uses_the_fused_noise_of_q_sample():
    seen = {}

    def model(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)

    d = df.GaussianDiffusion(model, S)
    x0 = torch.zeros(2, 3, 4, 4)
    loss = d.loss(x0, torch.tensor([5, 39]), seed=4)
    _, eps = df.ops.q_sample(x0, torch.tensor([5, 39]), None, S, seed=4)
    torch.testing.assert_close(loss, eps.square().mean())


def test_bad_arguments():
    d = df.GaussianDiffusion(Dummy(), S)
    with pytest.raises(ValueError, match="n"):
        d.sample(0)
    with pytest.raises(ValueError, match="seed, generator"):
        d.sample(1, seed=1, generator=torch.Generator())
    with pytest.raises(TypeError, match="model"):
        df.GaussianDiffusion(3, S)
    with pytest.raises(TypeError, match="schedule"):
        df.GaussianDiffusion(Dummy(), "linear")
    with pytest.raises(ValueError, match="shape"):
        df.GaussianDiffusion(lambda x, t: x, S).sample(1)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu)])
def test_fewer_steps_ddpm_and_ddim(backend):
    d = df.GaussianDiffusion(Dummy(), S, backend=backend)
    a = d.sample(2, seed=5, steps=10, method="ddim", eta=0.0, progress=False)
    b = d.sample(2, seed=5, steps=10, method="ddim", eta=0.0, progress=False)
    c = d.sample(2, seed=5, steps=10, method="ddpm", progress=False)
    assert torch.equal(a, b) and a.shape == (2, 3, 8, 8) and torch.isfinite(c).all()
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="steps"):
        d.sample(1, steps=0)
    with pytest.raises(ValueError, match="method"):
        d.sample(1, steps=5, method="plms")


@needs_cpu
def test_respaced_chains_fused_equal_reference():
    model = df.UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), sample_size=8, num_groups=4).eval()
    for method in ("ddpm", "ddim"):
        runs = [
            df.GaussianDiffusion(model, S, backend=b).sample(2, seed=1, steps=8, method=method, eta=0.3, progress=False)
            for b in ("torch", "cpu")
        ]
        err = (runs[0] - runs[1]).abs().max().item()
        print(f"respaced {method}: fused vs reference max err {err:.3g}")
        assert err <= 1e-3 * max(1.0, runs[0].abs().max().item())


def test_sampling_runs_the_model_in_eval_mode_and_restores_its_mode():
    """Dropout in train mode would break keyed noise's promise (the same images for the same seed)."""
    model = df.UNet(
        ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.5, sample_size=8, num_groups=8
    )
    d = df.GaussianDiffusion(model.train(), df.NoiseSchedule.linear(4, 1e-4, 0.02))
    first = d.sample(2, seed=7, progress=False)
    assert model.training
    assert torch.equal(first, d.sample(2, seed=7, progress=False))
    assert not model.eval().training and not d.sample(1, seed=7, progress=False).isnan().any()
    assert not model.training


def _dpmpp_reference_chain(model, schedule, x, timesteps, prediction_type):
    """DPM-Solver++(2M) written out with the reference step: first order at the first step, second after, the step
    to x_0 first order."""
    B = x.shape[0]
    x0_last = t_last = None
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        tb, tpb = torch.full((B,), t), torch.full((B,), t_prev)
        last = None if t_last is None else torch.full((B,), t_last)
        x, x0_last = df.reference.dpmpp_step(
            x, model(x, tb), tb, tpb, schedule, x0_last, last, prediction_type=prediction_type
        )
        t_last = t
    return x


@pytest.mark.parametrize("backend", ["torch", "triton", pytest.param("cpu", marks=needs_cpu)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [5, 10])
def test_dpmpp_2m_chain_equals_reference_loop(backend, prediction_type, steps):
    s = df.NoiseSchedule.linear(1000, 1e-4, 0.02)
    d = df.GaussianDiffusion(Dummy(), s, backend=backend, prediction_type=prediction_type)
    with df.ops.trace() as calls:
        got = d.sample(3, seed=11, steps=steps, method="dpmpp_2m", progress=False, check_finite=False)
    x_T = df.ops.keyed_normal((3, 3, 8, 8), seed=11, backend="torch")
    timesteps = [i * (1000 // steps) for i in range(steps)][::-1]
    with torch.no_grad():
        expected = _dpmpp_reference_chain(d.model, s, x_T, timesteps, prediction_type)
    err = (got - expected).abs().max().item()
    bound = 1e-5 * max(1.0, expected.abs().max().item())  # a short chain of a smooth model: tighter than DESIGN's
    print(f"dpmpp_2m {backend} {prediction_type} {steps} steps: max err {err:.3g} (bound {bound:.3g})")
    assert err <= bound
    served = [c.backend for c in calls if c.op == "dpmpp_step"]
    assert served == [backend] * steps


def test_dpmpp_2m_keyed_samples_and_no_noise_after_x_T():
    d = df.GaussianDiffusion(Dummy(), df.NoiseSchedule.linear(100, 1e-4, 0.02))
    opts = dict(steps=10, method="dpmpp_2m", progress=False)
    big = d.sample(6, seed=4, **opts)
    assert torch.equal(big[:2], d.sample(2, seed=4, **opts))
    assert torch.equal(big[3:5], d.sample(2, seed=4, sample_offset=3, **opts))
    g = torch.Generator().manual_seed(0)
    a = d.sample(2, generator=g, **opts)
    after = torch.randn(1, generator=g)  # the chain drew only x_T from the generator
    g2 = torch.Generator().manual_seed(0)
    x_T = torch.randn((2, 3, 8, 8), generator=g2)
    assert torch.equal(after, torch.randn(1, generator=g2))
    assert torch.equal(a, d.sample(2, generator=torch.Generator().manual_seed(0), **opts))
    assert not torch.equal(a, x_T)


def test_dpmpp_2m_bad_arguments():
    d = df.GaussianDiffusion(Dummy(), S)
    with pytest.raises(ValueError, match="method"):
        d.sample(1, method="dpmpp_4m", progress=False)
    for method in ("dpmpp_2m", "dpmpp_3m", "sde_dpmpp_2m", "unipc"):
        with pytest.raises(ValueError, match="cuda_graph"):
            d.sample(1, method=method, cuda_graph=True, device="cuda", progress=False)
    with pytest.raises(ValueError, match="steps"):
        d.sample(1, method="dpmpp_3m", steps=1001, progress=False)


def _multistep_reference_chain(model, schedule, x, timesteps, order, sde=False, seed=None, sample_offset=0):
    """DPM-Solver++(3M) / SDE-DPM-Solver++(2M) written out with the reference step as diffusers' step orders it:
    one order more each step up to ``order``, the step to x_0 first order (the reference makes it so), the one
    before it at most second order below 15 steps."""
    B = x.shape[0]
    hist = []  # (D, t) of the previous steps, newest last
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < n else -1
        k = min(order, i + 1, 2 if i == n - 2 and n < 15 else order)
        full = lambda v: None if v is None else torch.full((B,), v)  # noqa: E731
        d1, t1 = hist[-1] if k >= 2 else (None, None)
        d2, t2 = hist[-2] if k >= 3 else (None, None)
        x, d0 = df.reference.dpmpp_step(
            x, model(x, full(t)), full(t), full(t_prev), schedule, d1, full(t1), x0_last2=d2, t_last2=full(t2),
            sde=sde, seed=seed, sample_offset=sample_offset,
        )  # fmt: skip
        hist.append((d0, t))
    return x


@pytest.mark.parametrize("backend", ["torch", "triton", pytest.param("cpu", marks=needs_cpu)])
@pytest.mark.parametrize("method", ["dpmpp_3m", "sde_dpmpp_2m"])
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpmpp_3m_and_sde_chains_equal_reference_loop(backend, method, steps):
    s = df.NoiseSchedule.linear(1000, 1e-4, 0.02)
    d = df.GaussianDiffusion(Dummy(), s, backend=backend)
    with df.ops.trace() as calls:
        got = d.sample(3, seed=11, steps=steps, method=method, progress=False, check_finite=False)
    x_T = df.ops.keyed_normal((3, 3, 8, 8), seed=11, backend="torch")
    timesteps = [i * (1000 // steps) for i in range(steps)][::-1]
    order, sde = (3, False) if method == "dpmpp_3m" else (2, True)
    with torch.no_grad():
        expected = _multistep_reference_chain(d.model, s, x_T, timesteps, order, sde, seed=11)
    err = (got - expected).abs().max().item()
    bound = 1e-5 * max(1.0, expected.abs().max().item())
    print(f"{method} {backend} {steps} steps: max err {err:.3g} (bound {bound:.3g})")
    assert err <= bound
    assert [c.backend for c in calls if c.op == "dpmpp_step"] == [backend] * steps
    if method == "dpmpp_3m":  # the third-order terms are there: a 2M chain differs
        with torch.no_grad():
            two = _multistep_reference_chain(d.model, s, x_T, timesteps, 2)
        assert (two - expected).abs().max() > 1e-4


def _unipc_reference_chain(model, schedule, x, timesteps, order=2, solver_type="bh2"):
    """UniPC written out as diffusers' UniPCMultistepScheduler.step runs it (its update formulas, D1s and rho:
    ddpm_fast.reference.unipc_step.unipc_step), float64, on the schedule's integer timesteps (-1: x_0)."""
    from ddpm_fast.reference.unipc_step import _rhos, unipc_step

    abar = torch.cat([schedule.alphas_cumprod, torch.ones(1, dtype=torch.float64)])  # abar[-1]: x_0
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    lam = alpha.log() - sigma.log()
    n, B = len(timesteps), x.shape[0]
    x = x.double()
    ds, last, prev_order = [], None, 0
    for i, t in enumerate(timesteps):
        t_next = timesteps[i + 1] if i + 1 < n else -1
        m = model(x.float(), torch.full((B,), t)).double()
        d0 = (x - sigma[t] * m) / alpha[t]  # epsilon
        hist = ds[::-1]  # D1, D2, .. newest first

        def terms(t_, s0, earlier, k, corrector):
            h = lam[t_] - lam[s0]
            phi, b_h, rho, r = _rhos(h, lam[s0], [lam[e] for e in earlier], k, solver_type, corrector)
            return sigma[t_] / sigma[s0], alpha[t_], phi, b_h, rho, r

        p = min(order, n - i, i + 1)
        terms_c = (
            terms(t, timesteps[i - 1], timesteps[max(0, i - prev_order) : i - 1][::-1], prev_order, True) if i else None
        )
        if t_next < 0:  # the last step: first order, sigma = 0 there
            y = x if terms_c is None else unipc_step(x, d0, last, hist, terms(t, t, [], 1, False), terms_c)[1]
            x = d0 + 0 * y
        else:
            earlier = timesteps[max(0, i - p + 1) : i][::-1]
            x, y = unipc_step(x, d0, last, hist, terms(t_next, t, earlier, p, False), terms_c)
        ds.append(d0)
        last, prev_order = y, p
    return x


@pytest.mark.parametrize("backend", ["torch", "triton", pytest.param("cpu", marks=needs_cpu)])
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_unipc_chain_equals_diffusers_formulas(backend, steps):
    s = df.NoiseSchedule.linear(1000, 1e-4, 0.02)
    d = df.GaussianDiffusion(Dummy(), s, backend=backend)
    with df.ops.trace() as calls:
        got = d.sample(3, seed=11, steps=steps, method="unipc", progress=False, check_finite=False)
    x_T = df.ops.keyed_normal((3, 3, 8, 8), seed=11, backend="torch")
    timesteps = [i * (1000 // steps) for i in range(steps)][::-1]
    with torch.no_grad():
        expected = _unipc_reference_chain(d.model, s, x_T, timesteps)
    err = (got.double() - expected).abs().max().item()
    bound = 1e-5 * max(1.0, expected.abs().max().item())
    print(f"unipc {backend} {steps} steps: max err {err:.3g} (bound {bound:.3g})")
    assert err <= bound
    assert [c.backend for c in calls if c.op == "dpmpp_step"] == [backend] * steps
    with torch.no_grad():  # the corrector matters: DPM-Solver++(2M) (UniP-2 without UniC) gives other images
        other = d.sample(3, seed=11, steps=steps, method="dpmpp_2m", progress=False)
    assert (other.double() - expected).abs().max() > 1e-4


def test_sde_dpmpp_2m_keyed_noise_is_split_invariant_and_backend_independent():
    """sample(8)[:4] == sample(4) (z keyed by the sample's global index), the same images on the cpu and Triton
    kernels for the same seed, another seed gives others; with a generator, z comes from it in order."""
    d = df.GaussianDiffusion(Dummy(), df.NoiseSchedule.linear(100, 1e-4, 0.02))
    opts = dict(steps=10, method="sde_dpmpp_2m", progress=False)
    big = d.sample(8, seed=4, **opts)
    assert torch.equal(big[:4], d.sample(4, seed=4, **opts))
    assert torch.equal(big[5:7], d.sample(2, seed=4, sample_offset=5, **opts))
    runs = {}
    for backend in ["torch", "triton"] + (["cpu"] if df.backends()["cpu"].startswith("available") else []):
        runs[backend] = df.GaussianDiffusion(Dummy(), d.schedule, backend=backend).sample(4, seed=4, **opts)
    for backend, x in runs.items():
        err = (x - runs["torch"]).abs().max().item()
        print(f"sde_dpmpp_2m keyed, {backend} vs torch: max err {err:.3g}")
        assert err <= 1e-5 * max(1.0, runs["torch"].abs().max().item())
    ode = d.sample(4, seed=4, **{**opts, "method": "dpmpp_2m"})
    assert (ode - big[:4]).abs().max() > 1e-2  # the noise enters
    assert (d.sample(4, seed=5, **opts) - big[:4]).abs().max() > 1e-2
    a = d.sample(2, generator=torch.Generator().manual_seed(0), **opts)
    assert torch.equal(a, d.sample(2, generator=torch.Generator().manual_seed(0), **opts))
    assert not torch.equal(a, d.sample(2, generator=torch.Generator().manual_seed(1), **opts))


class _CastForFp32Chain(torch.nn.Module):
    """What the sampler must do with a bf16 model, written out: x_t cast to bf16 for the model, its output back to
    fp32 (no parameters of its own, so the sampler keeps this chain in fp32)."""

    def __init__(self, model):
        super().__init__()
        self.inner = [model]  # not a submodule: its bf16 parameters must not set the chain's dtype
        self.in_channels, self.sample_size = model.in_channels, model.sample_size

    def forward(self, x, t):
        return self.inner[0](x.bfloat16(), t).float()


@needs_cpu
@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpmpp_2m"])
def test_a_bf16_model_samples_with_the_chain_in_fp32(method):
    """model.to(bfloat16): x_t stays fp32 (cast for the model each step, its output cast back), so the keyed noise
    and every step's update run in fp32 on the fp32 chain; only the model's bf16 rounding separates the result from
    the fp32 model's (on random weights a clipped chain magnifies it: printed, not bounded)."""
    torch.manual_seed(0)
    cfg = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), sample_size=8, num_groups=8)
    fp32 = df.UNet(**cfg).eval()
    bf16 = df.UNet(**cfg).eval()
    bf16.load_state_dict(fp32.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    kw = dict(seed=3, progress=False, steps=10, method=method)
    with df.ops.trace() as calls:
        got = df.GaussianDiffusion(bf16, S).sample(2, **kw)
    calls.require_fused(backend="cpu", ops={"conv2d", "group_norm_silu", "attention"})
    want = df.GaussianDiffusion(_CastForFp32Chain(bf16), S).sample(2, **kw)
    fp32_chain = df.GaussianDiffusion(fp32, S).sample(2, **kw)
    print(
        f"bf16 model, {method} 10 steps: max diff from the written-out chain {(got - want).abs().max():.3g}, from "
        f"the fp32 model's chain {(got - fp32_chain).abs().max():.3g}"
    )
    assert got.dtype == torch.float32 and torch.equal(got, want)
    # an explicit dtype is the chain's
    assert df.GaussianDiffusion(bf16, S).sample(1, dtype=torch.bfloat16, **kw).dtype == torch.bfloat16
