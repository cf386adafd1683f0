"""The CPU inference runtimes a user would otherwise pick for a diffusers U-Net — OpenVINO and ONNX Runtime — as
benchmark providers built from the same ``UNet2DModel`` (the same weights ddpm_fast runs).

Each peer is a :class:`Peer`: a callable ``peer(x, t) -> torch.Tensor`` (x: (B, C, H, W) float32, t: a timestep
per sample or one for all, as diffusers' U-Net takes it), or, when it cannot be built (the runtime is not
installed, conversion or compilation failed), a Peer whose ``why`` says so: a benchmark shows it as a row with that
reason, never as a silent gap.

- OpenVINO: ``openvino.convert_model`` of the U-Net (traced at the example input), reshaped to the example's static
  shape and compiled for "CPU", once with ``INFERENCE_PRECISION_HINT=f32`` and once with the device's default
  precision (bf16 on CPUs with AMX or AVX512-BF16, f32 elsewhere); ``info["precision"]`` is the precision the
  compiled model reports, read back, not the one asked for.
- ONNX Runtime: ``torch.onnx.export`` of the U-Net (dynamic batch) into a temporary directory, run by an
  ``InferenceSession`` on the CPUExecutionProvider.

Both runtimes get torch's thread count (``torch.get_num_threads()`` unless ``threads=`` is given), recorded in
``info["threads"]``. Conversions are cached in ``cache`` (a dict the caller keeps) so that several batch sizes or
precisions convert the model once; ``info["convert_s"]`` is the conversion's time (0 when it came from the cache)
and ``info["compile_s"]`` the time to compile or load it.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import torch

PEER_NAMES = ("openvino f32", "openvino default", "onnxruntime")


@dataclass
class Peer:
    """A runtime serving the U-Net: ``peer(x, t)`` returns the U-Net's output as a float32 torch tensor. ``fn`` is
    None and ``why`` says why when the peer could not be built."""

    name: str
    fn: object = None
    why: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.fn is not None

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        if self.fn is None:
            raise RuntimeError(f"{self.name} is unavailable: {self.why}")
        return self.fn(x, t)

    def label(self) -> str:
        """The row's note: threads and precision, or why the peer is missing."""
        if not self.ok:
            return f"unavailable: {self.why}"
        parts = [f"{self.info['threads']} threads (torch's)"]
        if "precision" in self.info:
            parts.append(f"precision {self.info['precision']}")
        return ", ".join(parts)


class _Forward(torch.nn.Module):
    """The U-Net as a plain (x, t) -> tensor module, which the exporters trace."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t):
        return self.unet(x, t, return_dict=False)[0]


def _check(unet, x, t):
    if not isinstance(unet, torch.nn.Module):
        raise TypeError(f"unet: expected a diffusers UNet2DModel, got {type(unet).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError("x: expected a float32 CPU tensor of shape (B, C, H, W)")
    return x.contiguous(), _timesteps(t, x.shape[0])


def _timesteps(t, batch: int) -> torch.Tensor:
    """t as the (B,) int64 tensor the exported graphs take (diffusers' U-Net also accepts one timestep for all)."""
    t = torch.as_tensor(t).to(torch.int64).reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"t: expected one timestep or {batch}, got {t.numel()}")
    return t.contiguous()


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def _threads(threads) -> int:
    threads = torch.get_num_threads() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads: expected a positive count, got {threads}")
    return threads


def openvino_peer(unet, x, t, precision: str | None = "f32", threads=None, cache=None, name=None) -> Peer:
    """OpenVINO's CPU plugin serving ``unet``, compiled at x's static shape. ``precision``: "f32" (the
    INFERENCE_PRECISION_HINT asked for) or None (the device's default)."""
    name = name or ("openvino default" if precision is None else f"openvino {precision}")
    x, t = _check(unet, x, t)
    threads = _threads(threads)
    cache = {} if cache is None else cache
    info = {"runtime": "openvino", "threads": threads, "precision_asked": precision or "default"}
    try:
        import openvino as ov
    except Exception as e:  # ImportError, or a broken install
        return Peer(name, why=f"openvino not importable ({_why(e)})", info=info)
    info["version"] = ov.__version__
    try:
        key = ("openvino", id(unet))
        t0 = time.perf_counter()
        if key not in cache:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings from diffusers' shape checks
                # traced here without torch.jit.trace's check (two more forwards), which convert_model runs
                traced = torch.jit.trace(_Forward(unet).eval(), (x, t), check_trace=False, strict=False)
                cache[key] = ov.convert_model(traced, example_input=(x, t))
        info["convert_s"] = time.perf_counter() - t0
        model = cache[key].clone()
        model.reshape({model.inputs[0]: list(x.shape), model.inputs[1]: list(t.shape)})
        config = {"INFERENCE_NUM_THREADS": threads}
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        t0 = time.perf_counter()
        compiled = ov.Core().compile_model(model, "CPU", config)
        info["compile_s"] = time.perf_counter() - t0
        info["precision"] = _type_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        info["threads"] = int(compiled.get_property("INFERENCE_NUM_THREADS")) or threads
        info["performance_hint"] = str(compiled.get_property("PERFORMANCE_HINT"))
        request = compiled.create_infer_request()
    except Exception as e:
        return Peer(name, why=f"openvino conversion or compilation failed ({_why(e)})", info=info)
    batch = x.shape[0]

    def run(x, t):
        x = x.detach().contiguous()
        out = request.infer([x.numpy(), _timesteps(t, x.shape[0]).numpy()], share_inputs=True, share_outputs=False)
        return torch.from_numpy(out[0])

    info["batch"] = batch
    return Peer(name, fn=run, info=info)


def onnxruntime_peer(unet, x, t, threads=None, cache=None, name="onnxruntime") -> Peer:
    """ONNX Runtime's CPUExecutionProvider serving ``unet`` from a ``torch.onnx.export`` of it (dynamic batch,
    opset 17; the TorchScript exporter, which is much faster than the dynamo one, falling back to the dynamo
    exporter where it fails)."""
    x, t = _check(unet, x, t)
    threads = _threads(threads)
    cache = {} if cache is None else cache
    info = {"runtime": "onnxruntime", "threads": threads, "provider": "CPUExecutionProvider"}
    try:
        import onnxruntime as ort
    except Exception as e:
        return Peer(name, why=f"onnxruntime not importable ({_why(e)})", info=info)
    info["version"] = ort.__version__
    try:
        key = ("onnx", id(unet))
        t0 = time.perf_counter()
        if key not in cache:
            cache[key] = _export_onnx(unet, x, t, cache)
        info["convert_s"] = time.perf_counter() - t0
        info["exporter"] = cache[("onnx exporter", id(unet))]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        t0 = time.perf_counter()
        session = ort.InferenceSession(cache[key], options, providers=["CPUExecutionProvider"])
        info["compile_s"] = time.perf_counter() - t0
        names = [i.name for i in session.get_inputs()]
    except Exception as e:
        return Peer(name, why=f"onnx export or session failed ({_why(e)})", info=info)

    def run(x, t):
        x = x.detach().contiguous()
        out = session.run(None, {names[0]: x.numpy(), names[1]: _timesteps(t, x.shape[0]).numpy()})
        return torch.from_numpy(out[0])

    return Peer(name, fn=run, info=info)


def _export_onnx(unet, x, t, cache) -> str:
    """The U-Net as an ONNX file in a temporary directory that lives as long as ``cache``."""
    tmp = tempfile.TemporaryDirectory(prefix="ddpm_fast_onnx_")
    cache[("onnx dir", id(unet))] = tmp  # removed when the cache is dropped
    path = os.path.join(tmp.name, "unet.onnx")
    module = _Forward(unet).eval()
    names = dict(input_names=["sample", "timestep"], output_names=["out"])
    errors = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module, (x, t), path, dynamo=False, opset_version=17,
                dynamic_axes={"sample": {0: "batch"}, "timestep": {0: "batch"}}, **names,
            )  # fmt: skip
            cache[("onnx exporter", id(unet))] = "torch.onnx.export (TorchScript), opset 17"
            return path
        except Exception as e:
            errors.append(f"TorchScript exporter: {_why(e)}")
        try:
            batch = torch.export.Dim("batch")
            torch.onnx.export(
                module, (x, t), path, dynamo=True, dynamic_shapes={"x": {0: batch}, "t": {0: batch}}, **names
            )
            cache[("onnx exporter", id(unet))] = "torch.onnx.export (dynamo)"
            return path
        except Exception as e:
            errors.append(f"dynamo exporter: {_why(e)}")
    raise RuntimeError("; ".join(errors))


def build_peers(unet, x, t, threads=None, cache=None, names=PEER_NAMES) -> dict[str, Peer]:
    """The peers ``names`` (of PEER_NAMES) for ``unet`` at the example input (x, t), each converted once per
    ``cache``."""
    unknown = [n for n in names if n not in PEER_NAMES]
    if unknown:
        raise ValueError(f"names: unknown peers {unknown}; expected some of {list(PEER_NAMES)}")
    cache = {} if cache is None else cache
    builders = {
        "openvino f32": lambda: openvino_peer(unet, x, t, "f32", threads, cache),
        "openvino default": lambda: openvino_peer(unet, x, t, None, threads, cache),
        "onnxruntime": lambda: onnxruntime_peer(unet, x, t, threads, cache),
    }
    return {n: builders[n]() for n in names}


def openvino_default_precision() -> str | None:
    """The precision OpenVINO's CPU plugin uses when none is asked for, on this machine (None without openvino)."""
    try:
        import openvino as ov

        return _type_name(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))
    except Exception:
        return None


def _type_name(t) -> str:
    """An openvino element type as its short name ("f32", "bf16", "f16")."""
    return t.get_type_name() if hasattr(t, "get_type_name") else str(t)
