"""CUDA-graph sampling (ddpm_fast.graphs): the device-table step equals the eager sampler.

Here (no GPU) the capturable body runs eagerly on CPU tensors through the Triton interpreter, which checks the
step tables, the on-device step index and the kernel reading t and coefficients from memory; on a GPU the same
test captures and replays the graph.
"""

import pytest
import torch

import ddpm_fast as df
from ddpm_fast.graphs import GraphedSampler
from tests.helpers import DEV, needs_triton

pytest.importorskip("triton")


def _diffusion(**kw):
    torch.manual_seed(0)
    cfg = dict(in_channels=1, out_channels=1, sample_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1)
    model = df.UNet(**cfg, attn_resolutions=(4,), num_groups=4, dropout=0.0).eval().to(DEV)
    return df.GaussianDiffusion(model, df.NoiseSchedule.linear(100), backend="triton", **kw)


@needs_triton
@pytest.mark.parametrize(
    "method, eta, kw",
    [("ddpm", 0.0, {}), ("ddim", 0.5, dict(clip_sample=False)), ("ddpm", 0.0, dict(prediction_type="v_prediction"))],
)
def test_graphed_chain_equals_eager(method, eta, kw):
    d = _diffusion(**kw)
    timesteps = list(range(90, -1, -10))  # respaced to 10 steps as sample(steps=10) does
    g = GraphedSampler(d, 3, (1, 8, 8), timesteps, method=method, eta=eta, device=DEV)
    for offset in (0, 5):
        with df.ops.trace() as calls:
            got = g.sample(seed=11, sample_offset=offset)
        calls.require_fused("graphed sampler", ops=["keyed_normal", f"{method}_step"])  # a graph: at its capture
        if not g.capture:  # eager: one step kernel per timestep
            assert calls.counts()[(f"{method}_step", "triton", "triton")] == len(timesteps), calls.summary()
        want = d.sample(3, seed=11, sample_offset=offset, steps=10, method=method, eta=eta, progress=False)
        err = (got - want).abs().max().item()
        print(f"graphed {method} eta={eta} {kw} offset={offset}: max err {err:.2e} (capture={g.capture})")
        assert err <= 1e-5


def test_graph_arguments_are_checked():
    d = _diffusion()
    with pytest.raises(ValueError, match="cuda_graph: needs keyed noise"):
        d.sample(2, generator=torch.Generator(), cuda_graph=True, device=DEV)
    if DEV == "cpu":
        with pytest.raises(ValueError, match="cuda_graph: needs a CUDA device"):
            d.sample(2, seed=0, cuda_graph=True)
        with pytest.raises(ValueError, match="capture: CUDA graphs need a CUDA device"):
            GraphedSampler(d, 2, (1, 8, 8), [9, 0], device="cpu", capture=True)


class _EagerGraph:
    """Stands in for a captured CUDA graph on the CPU: a replay runs the captured body eagerly."""

    def __init__(self, body):
        self.replay = body


@needs_triton
def test_graph_is_captured_again_when_a_weight_changes():
    """A graph replays the addresses it recorded: after a parameter changes in place or is replaced (and the
    attention block's derived projection with it), the sampler captures anew instead of replaying stale or
    freed memory; a new noise key also captures anew, the same key and weights replay."""
    d = _diffusion()
    g = GraphedSampler(d, 2, (1, 8, 8), [90, 50, 10], device=DEV)
    captures = []
    if not g.capture:  # no GPU: the capture/replay bookkeeping with the body run eagerly in place of replays
        g.capture = True

        def fake_capture(seed, sample_offset, x_T):
            captures.append((seed, sample_offset))
            g.graph = _EagerGraph(lambda: g._body(seed, sample_offset))

        g._capture = fake_capture
    else:
        real = g._capture

        def counting_capture(*args):
            captures.append(args[:2])
            real(*args)

        g._capture = counting_capture

    a = g.sample(seed=3)
    b = g.sample(seed=3)
    assert len(captures) == 1 and torch.equal(a, b)
    g.sample(seed=4)
    assert len(captures) == 2
    attn = next(m for m in d.model.modules() if isinstance(m, df.models.unet.AttnBlock))
    with torch.no_grad():
        attn.to_v.weight.mul_(2.0)  # in place: a new version; the derived projection must be rebuilt
    c = g.sample(seed=4)
    assert len(captures) == 3
    want = GraphedSampler(d, 2, (1, 8, 8), [90, 50, 10], device=DEV, capture=False).sample(seed=4)
    err = (c - want).abs().max().item()
    print(f"after an in-place weight change: max err vs the eager body {err:.2e}")
    assert err <= 1e-5
    d.model.conv_in.weight = torch.nn.Parameter(d.model.conv_in.weight.detach().clone())  # replaced
    g.sample(seed=4)
    assert len(captures) == 4
    g.sample(seed=4)
    assert len(captures) == 4
