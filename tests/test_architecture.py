"""Imports point down the layers that ARCHITECTURE.md draws; no code generator imports another target.

Every ``attncc`` module is given a layer below; a module may import its own layer and the layers
under it, never one above. A new module must be placed here (the test says so), which is the point:
where it sits is decided once, in review, not discovered later as a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"attncc": "attncc", "ir": "attncc.ir", "passes": "attncc.passes", "codegen": "attncc.codegen"}


def _names(text: str) -> set[str]:
    return set(text.split())


LAYERS: list[tuple[str, set[str]]] = [
    ("base", _names("errors config diskcache memo ir.dispatch")),
    ("ir", _names("ir ir.core ir.exprs ir.attrs ir.ops ir.text ir.boxeval ir.intervals ir.pointeval")),
    # what users write: the DSL, specs, tracing, and spec -> decomposed IR
    ("declarations", _names("dsl torchfuncs trace masks mods neighborhood routing spec rope linear lower validate")),
    (
        "analysis",
        _names("analysis analysis.bands analysis.tiling analysis.blockmap analysis.costmodel analysis.picture")
        | {"passes.normalize"},
    ),
    (
        "passes",
        _names(
            "passes passes.base passes.canonicalize passes.fuse passes.recognize passes.block_sparse passes.head_shard"
        ),
    ),
    ("plan", {"plan"}),
    (
        "targets",
        {
            f"codegen.{m}"
            for m in _names("printer emit_cpp emit_torch emit_triton helpers fallback toolchain interpret target")
        }
        | {f"codegen.{m}" for m in _names("reference cpu cpu_template cpu_linear triton triton_template triton_linear")}
        | {"codegen"},
    ),
    (
        "api",
        _names(
            "api sharding distributed dump cli dynamo frontends frontends.fx frontends.onnx frontends.onnx_export "
            "frontends.onnx_masks frontends.symtensor "
            "__init__"
        ),
    ),
]
# the code generators of different targets never import each other (triton_linear is the triton target's,
# cpu_linear the cpu target's)
TARGETS = {"codegen.cpu": "cpu", "codegen.reference": "reference", "codegen.triton": "triton",
           "codegen.triton_linear": "triton", "codegen.cpu_linear": "cpu"}  # fmt: skip


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.with_suffix("").relative_to(ROOT / folder).parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found["__init__" if name == "attncc" else name.removeprefix("attncc.")] = path
    return found


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("attncc"):
            base = node.module.removeprefix("attncc").lstrip(".")
            for alias in node.names:
                full = f"{base}.{alias.name}" if base else alias.name
                out.add(full if full in RANK else base)
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("attncc.") for a in node.names if a.name.startswith("attncc.")}
    return {m for m in out if m}


RANK = {module: i for i, (_, members) in enumerate(LAYERS) for module in members}


def test_every_module_has_a_layer() -> None:
    missing = sorted(set(_modules()) - set(RANK))
    assert not missing, f"place these modules in a layer of tests/test_architecture.py: {missing}"


def test_imports_point_down() -> None:
    upward = []
    for module, path in _modules().items():
        for dep in _imports(path):
            if dep in RANK and RANK[dep] > RANK[module]:
                upward.append(f"{module} ({LAYERS[RANK[module]][0]}) imports {dep} ({LAYERS[RANK[dep]][0]})")
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_no_target_imports_another() -> None:
    crossing = []
    for module, target in TARGETS.items():
        for dep in _imports(_modules()[module]):
            if dep in TARGETS and TARGETS[dep] != target:
                crossing.append(f"{module} imports {dep}")
    assert not crossing, crossing


def test_no_module_reads_another_modules_private_names() -> None:
    private = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("attncc"):
                private += [f"{module}: from {node.module} import {a.name}" for a in node.names if a.name[0] == "_"]
    assert not private, private
