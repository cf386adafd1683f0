"""FusedUniPCMultistepScheduler through the checks of diffusers' own UniPCMultistepScheduler test-suite: its pinned
full-loop results (10 steps of the dummy model x * t / (t + 1) on the deterministic sample, 4-D and 1-D samples,
diffusers' test config: bh2, order 2, final sigma sigma_min), save/load giving the same steps over its config sweeps
(each step fused, asserted through ops.trace()), and no NaN over orders 1-3, bh1/bh2 and prediction types."""

import pytest
import torch

import ddpm_fast as df
from ddpm_fast import ops
from tests.helpers import needs_cpu

diffusers = pytest.importorskip("diffusers")

CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    solver_order=2,
    solver_type="bh2",
    final_sigmas_type="sigma_min",
)


def _deterministic(shape):
    """diffusers' dummy_sample_deter: arange over (C, *spatial, B) / n, batch moved first."""
    n = 1
    for s in shape:
        n *= s
    x = torch.arange(n).reshape(*shape[1:], shape[0]) / n
    return x.permute(-1, *range(len(shape) - 1))


def _model(sample, t):
    t = torch.as_tensor(t).reshape(-1, *(1,) * (sample.dim() - 1)).to(sample.dtype)
    return sample * t / (t + 1)


def _full_loop(shape, **config):
    scheduler = df.FusedUniPCMultistepScheduler(**{**CONFIG, **config})
    scheduler.set_timesteps(10)
    sample = _deterministic(shape)
    with ops.trace() as calls:
        for t in scheduler.timesteps:
            sample = scheduler.step(_model(sample, t), t, sample).prev_sample
    calls.require_fused("UniPC full loop", ops={"dpmpp_step"})
    return sample


# diffusers' pinned mean |x| after the 10-step loop: (config, 4-D value, 1-D value)
PINNED = [
    (dict(), 0.2464, 0.2441),
    (dict(use_karras_sigmas=True), 0.2925, 0.2898),
    (dict(prediction_type="v_prediction"), 0.1014, 0.1014),
    (dict(prediction_type="v_prediction", use_karras_sigmas=True), 0.1966, 0.1944),
]


@needs_cpu
@pytest.mark.parametrize("config, mean_4d, mean_1d", PINNED, ids=lambda v: str(v))
def test_full_loops_give_diffusers_pinned_results(config, mean_4d, mean_1d):
    for shape, pinned in (((4, 3, 8, 8), mean_4d), ((4, 3, 8), mean_1d)):
        got = _full_loop(shape, **config).abs().mean().item()
        print(f"{config} {len(shape)}-D: mean |x| {got:.5f} (diffusers' suite pins {pinned})")
        assert abs(got - pinned) < 1e-3


@needs_cpu
def test_full_loop_with_noise_gives_diffusers_pinned_sum():
    scheduler = df.FusedUniPCMultistepScheduler(**CONFIG)
    scheduler.set_timesteps(10)
    shape = (4, 3, 8, 8)
    n = 4 * 3 * 8 * 8  # diffusers' dummy_noise_deter: the reversed arange, laid out as the sample
    noise = (torch.arange(n).flip(-1).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)
    timesteps = scheduler.timesteps[8 * scheduler.order :]
    sample = scheduler.add_noise(_deterministic(shape), noise, timesteps[:1])
    for t in timesteps:
        sample = scheduler.step(_model(sample, t), t, sample).prev_sample
    total, mean = sample.abs().sum().item(), sample.abs().mean().item()
    print(f"with noise: sum |x| {total:.4f} (pinned 315.5757), mean {mean:.4f} (pinned 0.4109)")
    assert scheduler.fused and abs(total - 315.5757) < 1e-2 and abs(mean - 0.4109) < 1e-3


SWEEPS = (
    [dict(num_train_timesteps=n) for n in (25, 50, 100, 999, 1000)]
    + [dict(prediction_type=p) for p in ("epsilon", "v_prediction")]
    + [
        dict(solver_order=o, solver_type=s, prediction_type=p)
        for o in (1, 2, 3)
        for s in ("bh1", "bh2")
        for p in ("epsilon", "sample")
    ]  # fmt: skip
    + [dict(lower_order_final=v) for v in (True, False)]
)


@needs_cpu
@pytest.mark.parametrize("config", SWEEPS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_saved_and_loaded_scheduler_steps_alike_and_as_diffusers(config, tmp_path):
    """diffusers' check_over_configs: a scheduler and its save/load copy step alike from the same history (here
    also: as diffusers' own scheduler does, within 1e-6, and fused)."""
    sample = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    residual = 0.1 * sample
    past = [residual + 0.2, residual + 0.15, residual + 0.10]
    ours = df.FusedUniPCMultistepScheduler(**{**CONFIG, **config})
    ours.save_config(tmp_path)
    loaded = df.FusedUniPCMultistepScheduler.from_pretrained(tmp_path)
    theirs = diffusers.UniPCMultistepScheduler(**{**CONFIG, **config})
    outs = []
    for s in (ours, loaded, theirs):
        s.set_timesteps(25)
        s.model_outputs = past[: s.config.solver_order]
        x = sample
        for i in range(s.config.solver_order + 1):
            x = s.step(residual, s.timesteps[i], x).prev_sample
            if s is not theirs:
                assert s.fused, s.unfused_reason(residual, x)
        outs.append(x)
    assert torch.equal(outs[0], outs[1])
    err = (outs[0] - outs[2]).abs().max().item()
    print(f"{config}: save/load identical; vs diffusers max err {err:.3g}")
    assert err <= 1e-6 * max(1.0, outs[2].abs().max().item())


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_orders_and_types_give_no_nan(dtype):
    for order in (1, 2, 3):
        for solver_type in ("bh1", "bh2"):
            for prediction_type in ("epsilon", "sample"):
                cfg = dict(solver_order=order, solver_type=solver_type, prediction_type=prediction_type)
                sample = _full_loop((4, 3, 8, 8), **cfg) if dtype == torch.float32 else None
                if sample is None:
                    s = df.FusedUniPCMultistepScheduler(**{**CONFIG, **cfg})
                    s.set_timesteps(10)
                    sample = _deterministic((4, 3, 8, 8)).half()
                    for t in s.timesteps:
                        sample = s.step(_model(sample, t), t, sample).prev_sample
                    assert sample.dtype == torch.float16 and s.fused
                assert not sample.isnan().any(), cfg
