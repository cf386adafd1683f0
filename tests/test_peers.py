"""benchmarks/peers.py: OpenVINO and ONNX Runtime serving a diffusers UNet2DModel match diffusers' fp32 forward, and
a peer that cannot be built is a Peer with a reason, not an exception."""

import builtins
import os
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
TINY = dict(
    sample_size=8,
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=4,
)


def _peers():
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    import peers  # benchmarks/peers.py

    return peers


@pytest.fixture(scope="module")
def tiny():
    # one thread: at this size a forward is a few ms, and a second thread only waits on a shared machine (the
    # exporters run the model several times)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**TINY).eval()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([1, 250, 999])
    with torch.no_grad():
        expected = unet(x, t).sample
    yield unet, x, t, expected
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache():
    return {}  # one ONNX export of the tiny U-Net for the tests that use it (dynamic batch)


def _check_matches(peer, x, t, expected):
    assert peer.ok, peer.why
    out = peer(x, t)
    assert isinstance(out, torch.Tensor) and out.shape == expected.shape and out.dtype == torch.float32
    err = (out - expected).abs()
    print(f"{peer.name}: max err {err.max():.3g}, mean {err.mean():.3g}; {peer.info}")
    assert err.max() <= 1e-4


def test_openvino_f32_matches_diffusers(tiny):
    pytest.importorskip("openvino")
    peers = _peers()
    unet, x, t, expected = tiny
    peer = peers.openvino_peer(unet, x, t, "f32")
    _check_matches(peer, x, t, expected)
    assert peer.info["precision"] == "f32"  # read back from the compiled model
    assert peer.info["threads"] == torch.get_num_threads() == 1
    with torch.no_grad():  # one timestep for the whole batch, as diffusers' pipelines pass it (a 0-d tensor)
        one_t = unet(x, torch.tensor(7)).sample
    assert (peer(x, torch.tensor(7)) - one_t).abs().max() <= 1e-4
    assert "threads" in peer.label() and "f32" in peer.label()


def test_onnxruntime_matches_diffusers_at_every_batch(tiny, cache):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    peers = _peers()
    unet, x, t, expected = tiny
    peer = peers.onnxruntime_peer(unet, x, t, cache=cache)
    _check_matches(peer, x, t, expected)
    assert peer.info["threads"] == torch.get_num_threads()
    with torch.no_grad():  # the export has a dynamic batch: one session serves other batch sizes
        one = unet(x[:1], torch.tensor(42)).sample
    assert (peer(x[:1], torch.tensor(42)) - one).abs().max() <= 1e-4


def test_a_peer_that_cannot_import_is_a_row_with_a_reason(tiny, monkeypatch):
    peers = _peers()
    unet, x, t, _ = tiny
    real_import = builtins.__import__

    def no_runtimes(name, *args, **kwargs):
        if name.split(".")[0] in ("openvino", "onnxruntime"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_runtimes)
    built = peers.build_peers(unet, x, t)
    assert list(built) == list(peers.PEER_NAMES)
    for name, peer in built.items():
        print(name, peer.why)
        assert not peer.ok
        assert "not importable" in peer.why and "No module named" in peer.why
        assert peer.label().startswith("unavailable: ")
        with pytest.raises(RuntimeError, match="unavailable"):
            peer(x, t)


def test_a_conversion_failure_is_a_row_with_a_reason(tiny):
    pytest.importorskip("onnxruntime")
    peers = _peers()
    unet, x, t, _ = tiny
    cache = {("onnx", id(unet)): "/nonexistent/unet.onnx", ("onnx exporter", id(unet)): "none"}
    peer = peers.onnxruntime_peer(unet, x, t, cache=cache)
    print(peer.why)
    assert not peer.ok and "failed" in peer.why


def test_bad_arguments(tiny):
    peers = _peers()
    unet, x, t, _ = tiny
    with pytest.raises(TypeError, match="unet"):
        peers.openvino_peer("unet", x, t)
    with pytest.raises(ValueError, match="x"):
        peers.onnxruntime_peer(unet, x.double(), t)
    with pytest.raises(ValueError, match="t"):
        peers.onnxruntime_peer(unet, x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="threads"):
        peers.openvino_peer(unet, x, t, threads=0)
    with pytest.raises(ValueError, match="names"):
        peers.build_peers(unet, x, t, names=["tensorrt"])


def test_diffusers_pipeline_with_a_peer_serving_its_unet_gives_diffusers_images(tiny, cache):
    # benchmarks/sample_speed.py's peer rows: diffusers' own loop, same scheduler and generator, the peer's forward
    pytest.importorskip("onnxruntime")
    peers = _peers()
    import sample_speed

    unet, x, t, _ = tiny
    peer = peers.onnxruntime_peer(unet, x[:2], t[:2], cache=cache)
    assert peer.ok, peer.why
    images = {}
    for name, pipe in (
        ("diffusers", diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=20))),
        ("peer", sample_speed.peer_pipeline(peer, unet, diffusers.DDPMScheduler(num_train_timesteps=20))),
    ):
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(3)
        images[name] = pipe(batch_size=2, generator=g, num_inference_steps=20, output_type="np").images
    err = abs(images["peer"] - images["diffusers"]).max()
    print(f"20-step chain, onnxruntime vs diffusers: max err {err:.3g}")
    assert images["peer"].shape == (2, 8, 8, 3)
    assert err <= 1e-3
