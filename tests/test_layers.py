"""The package's layers: no module imports from a layer above its own.

    _ext, _io, _console, schedule  <  reference  <  kernels (Triton)  <  ops  <  models  <  diffusion, graphs
        <  sample, digits, integrations  <  cli, the package itself

The model calls only ``ddpm_fast.ops`` (no private torch op, no extension module), and ``ops/__init__.py`` holds the
public ops, not backend code.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = [
    ("ddpm_fast._ext", "ddpm_fast._io", "ddpm_fast._console", "ddpm_fast.schedule"),
    ("ddpm_fast.reference",),
    ("ddpm_fast.kernels",),
    ("ddpm_fast.ops",),
    ("ddpm_fast.models",),
    ("ddpm_fast.diffusion", "ddpm_fast.graphs"),
    ("ddpm_fast.sample", "ddpm_fast.digits", "ddpm_fast.integrations"),
    ("ddpm_fast.cli", "ddpm_fast"),
]


def _layer(module: str) -> int | None:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (i, p)
    return None if best is None else best[0]


def _sources():
    """(module name, path) of every package source (kernels/ is installed as ddpm_fast.kernels)."""
    for base, package in ((ROOT / "ddpm_fast", "ddpm_fast"), (ROOT / "kernels", "ddpm_fast.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            yield ".".join([package, *parts]), path, is_package


def _imports(module: str, path: pathlib.Path, is_package: bool):
    """The ddpm_fast modules ``path`` imports (absolute names), at any depth of its code."""
    package = module if is_package else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names = [f"{stem}.{a.name}" for a in node.names] if not node.module or node.level else [stem]
        else:
            continue
        yield from (n for n in names if n == "ddpm_fast" or n.startswith("ddpm_fast."))


def test_no_module_imports_upward():
    upward = []
    for module, path, is_package in _sources():
        own = _layer(module)
        assert own is not None, f"{module}: in no layer of tests/test_layers.py; add it"
        for name in _imports(module, path, is_package):
            target = _layer(name)
            if target is not None and target > own:
                upward.append(f"{path.relative_to(ROOT)}: {module} (layer {own}) imports {name} (layer {target})")
    print("\n".join(upward) or "no upward import")
    assert not upward


def test_the_model_calls_only_ddpm_fast_ops():
    text = (ROOT / "ddpm_fast/models/unet.py").read_text()
    for private in ("torch.ops", "torch._C", "mkldnn", "_ext"):
        assert private not in text, f"models/unet.py uses {private}"
    imported = set(_imports("ddpm_fast.models.unet", ROOT / "ddpm_fast/models/unet.py", False))
    print(sorted(imported))
    assert {n.rsplit(".", 1)[0] if n.startswith("ddpm_fast.models.") else n for n in imported} <= {
        "ddpm_fast.ops",
        "ddpm_fast.models.loading",
    }


def test_public_ops_hold_no_backend_code():
    """ops/__init__.py: signatures, docs and validation; kernels are called from the backend modules only."""
    path = ROOT / "ddpm_fast/ops/__init__.py"
    imported = set(_imports("ddpm_fast.ops", path, True))
    print(sorted(imported))
    backends = {f"ddpm_fast.ops.{b}" for b in ("_torch", "_cpu", "_triton", "_cuda")}
    assert not imported & backends, "ops/__init__.py imports a backend module (go through _registry.module)"
    assert not any(n.startswith("ddpm_fast.kernels") for n in imported)
    calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute) and n.attr == "ops"]
    assert not calls, "ops/__init__.py calls torch.ops.* itself"
