import pytest
import torch

import ddpm_fast as df


def _tiny(**kw):
    cfg = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), sample_size=8, dropout=0.0, num_groups=8)
    cfg.update(kw)
    return df.UNet(**cfg)


def test_cifar10_model_has_the_paper_size():
    m = df.UNet.ddpm_cifar10()
    n = sum(p.numel() for p in m.parameters())
    print(f"UNet.ddpm_cifar10(): {n:,} parameters")
    assert n == 35_746_307  # diffusers' UNet2DModel with the google/ddpm-cifar10-32 configuration


def test_forward_shapes_and_timestep_forms():
    torch.manual_seed(0)
    m = _tiny(num_heads=2).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        a = m(x, 7)
        b = m(x, torch.tensor([7, 7, 7]))
        c = m(x, torch.tensor([1, 7, 500]))
    assert a.shape == x.shape
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[0], c[0])  # the time embedding matters
    torch.testing.assert_close(a[1], c[1])


def test_training_gradients_equal_the_reference():
    """Through the ops, autograd runs the reference path: same gradients as with backend='torch'."""
    torch.manual_seed(0)
    m = _tiny()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    grads = {}
    for backend in ("torch", None):
        m.set_backend(backend)
        m.zero_grad()
        m(x, t).square().mean().backward()
        grads[backend] = [p.grad.clone() for p in m.parameters()]
    for g_ref, g in zip(grads["torch"], grads[None]):
        torch.testing.assert_close(g, g_ref)


def test_bad_input():
    m = _tiny()
    with pytest.raises(ValueError, match="x"):
        m(torch.zeros(2, 1, 8, 8), 3)
    with pytest.raises(ValueError, match="num_groups|ch"):
        df.UNet(ch=30, num_groups=32)
    with pytest.raises(ValueError, match="num_heads"):
        _tiny(num_heads=3)
