"""The package's layering (docs/ARCHITECTURE.md), read from the source with `ast`: no module imports a module of
a higher layer or of a layer it is not meant to know, and no import cycle exists between modules. Lazy imports
inside functions count, since they run too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import qsparse_infer

PACKAGE = "qsparse_infer"
ROOT = Path(qsparse_infer.__file__).resolve().parent

# Lowest first. A module may import only modules of its own layer and of the layers its entry in ALLOWED names.
RANK = {
    "atomic_io": 0, "packing": 0, "_C": 0, "_build_info": 0,  # leaves: standard library, torch, the compiled module
    "model": 1, "kernels": 1,  # the spec and file (no GPU code); the kernel wrappers (no model)
    "convert": 2, "train": 2, "generate": 2,
    "gpu": 3,
    "serving": 4,
    "engine": 5, "bench": 5,
    "__init__": 6,  # the public Python API: Engine, convert, ModelConfig, SparsityConfig
    "cli": 7,
}
ALLOWED = {
    "atomic_io": set(), "packing": set(), "_C": set(), "_build_info": set(),
    "model": {"atomic_io", "packing"},
    "kernels": {"packing", "_C", "_build_info"},
    "convert": {"model", "packing", "atomic_io"},
    "train": {"model", "packing", "atomic_io"},
    "generate": {"model"},
    "gpu": {"model", "kernels", "generate", "packing"},
    "serving": {"model", "kernels", "gpu", "generate", "packing"},
    "engine": {"model", "kernels", "gpu", "generate", "serving", "packing"},
    "bench": {"model", "kernels", "gpu", "generate", "packing", "atomic_io"},
    "__init__": {"model", "convert", "engine"},
    "cli": {"__init__", "engine", "serving", "model", "kernels", "generate", "convert", "bench", "train", "gpu"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:]) if name != PACKAGE else Path()
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """The package modules that `path` imports (each `from X import name` counts as X.name where that is a
    module, else X)."""
    me = _module_name(path)
    pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if _is_module(sub) or a.name in ("_C", "_build_info") else target)
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


GRAPH = {_module_name(p): _imports(p) for p in sorted(ROOT.rglob("*.py"))}


def test_every_module_has_a_layer():
    missing = sorted({_layer(m) for m in GRAPH} - set(RANK))
    assert not missing, f"modules outside every layer (add them to RANK and ALLOWED): {missing}"
    # ALLOWED itself runs downhill only, so a permitted import can never be an upward one
    for layer, deps in ALLOWED.items():
        assert all(RANK[d] < RANK[layer] for d in deps), (layer, {d: RANK[d] for d in deps})


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_upward_or_sideways_import(module):
    me = _layer(module)
    bad = sorted(t for t in GRAPH[module] if _layer(t) != me and _layer(t) not in ALLOWED[me])
    assert not bad, f"{module} (layer {me!r}) imports {bad}; {me!r} may import only {sorted(ALLOWED[me])}"


def test_serving_never_imports_the_engine():
    for module, targets in GRAPH.items():
        if _layer(module) == "serving":
            assert f"{PACKAGE}.engine" not in targets, module


def test_no_import_cycle():
    """Depth-first search over module -> imported module edges (parents' __init__ imports not counted)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if t == m or t not in GRAPH:
                continue
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The reader above catches the kind of import it exists to forbid (model/ reaching up into gpu/)."""
    fake = tmp_path / PACKAGE
    (fake / "model").mkdir(parents=True)
    (fake / "gpu").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "model" / "__init__.py").write_text("")
    (fake / "gpu" / "__init__.py").write_text("")
    (fake / "gpu" / "model.py").write_text("X = 1\n")
    (fake / "model" / "random_model.py").write_text("def f():\n    from ..gpu.model import X\n    return X\n")
    global ROOT
    saved, ROOT = ROOT, fake
    try:
        targets = _imports(fake / "model" / "random_model.py")
    finally:
        ROOT = saved
    assert targets == {f"{PACKAGE}.gpu.model"}
    assert _layer(f"{PACKAGE}.gpu.model") not in ALLOWED["model"]
