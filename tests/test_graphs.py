"""CUDA-graph sampling (ddpm_fast.graphs): the device-table step equals the eager sampler.

Here (no GPU) the capturable body runs eagerly on CPU tensors through the Triton interpreter, which checks the
step tables, the on-device step index and the kernel reading t and coefficients from memory; on a GPU the same
test captures and replays the graph.
"""

import pytest
import torch

import ddpm_fast as df
from ddpm_fast.graphs import GraphedSampler

pytest.importorskip("triton")
needs_triton = pytest.mark.skipif(df.backends()["triton"] != "available", reason=df.backends()["triton"])
DEV = "cuda" if torch.cuda.is_available() else "cpu"


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
        got = g.sample(seed=11, sample_offset=offset)
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
