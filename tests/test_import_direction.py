"""Data flows one way: model_zoo -> rewrites -> quant -> targets -> validate -> bench, no arrow back.

Every module of the package is parsed (imports inside functions count: a lazy import is still a
dependency) and mapped to its layer; a module may import only its own layer or lower ones.

====  =====================================================================================
rank  modules (``s2dit_deploy.`` omitted)
====  =====================================================================================
0     leaf core: errors, socs, metrics, manifest_schema (import nothing above themselves)
1     model_zoo
2     model core: stages, recording, bundle, video_io, weights_source (any later layer may use them)
3     rewrites, analysis
4     quant
5     targets
6     host, compiler (run / build bundles through the targets)
7     fidelity (validate)
8     bench
9     commands, cli (and ``__main__``), api, the package ``__init__``
--    reference_training: a side branch; imports ranks 0-2 only, imported only from rank 9
====  =====================================================================================

quant/'s own import graph must also be acyclic (function-level imports included), so no cycle
hides behind a lazy import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "s2dit_deploy"
FOLDERS = {PKG: PKG, "model_zoo": f"{PKG}.model_zoo", "quant": f"{PKG}.quant", "targets": f"{PKG}.targets",
           "bench": f"{PKG}.bench", "reference_training": f"{PKG}.reference_training"}
SIDE = "reference_training"
SIDE_MAY_IMPORT = 2
RANKS = {  # longest matching prefix (after "s2dit_deploy.") wins
    "errors": 0, "socs": 0, "metrics": 0, "manifest_schema": 0,
    "model_zoo": 1,
    "stages": 2, "recording": 2, "bundle": 2, "video_io": 2, "weights_source": 2, "memory_budget": 2,
    "rewrites": 3, "analysis": 3,
    "quant": 4,
    "targets": 5,
    "host": 6, "compiler": 6, "app_bundle": 6,
    "fidelity": 7,
    "bench": 8,
    "commands": 9, "cli": 9, "__main__": 9, "api": 9, "": 9,
    SIDE: None,
}


def modules() -> Iterator[tuple[str, Path]]:
    """(dotted module name, file) for every module of the installed package layout."""
    for folder, pkg in FOLDERS.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            parts = list(f.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[0].startswith("test_") or parts[-1].startswith("test_"):
                continue  # bench/test_*.py are pytest-benchmark files, not package modules
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join([pkg, *parts]), f


def imports(name: str, source: str, is_package: bool = False) -> Iterator[tuple[str, int]]:
    """Every module ``name`` imports (absolute, relative resolved), at any depth of the file."""
    base = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                head = base[:len(base) - (node.level - 1)]
                mod = ".".join(head + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod, node.lineno
            for alias in node.names:  # `from . import x` imports the module x
                yield f"{mod}.{alias.name}", node.lineno


def rank_key(module: str) -> str | None:
    """The RANKS key of a package module, None for anything outside the package."""
    if module != PKG and not module.startswith(PKG + "."):
        return None
    rest = module[len(PKG) + 1:] if module != PKG else ""
    parts = rest.split(".") if rest else []
    if not parts:
        return ""
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in RANKS:
            return key
    raise AssertionError(f"{module} has no layer in tests/test_import_direction.py RANKS: add it")


KNOWN = {name for name, _ in modules()}


def violations(name: str, source: str, is_package: bool = False) -> list[str]:
    """Each import of ``name`` that points up the pipeline."""
    own = rank_key(name)
    bad = []
    for mod, line in imports(name, source, is_package):
        while mod not in KNOWN and mod.count(".") > 0 and mod.startswith(PKG + "."):
            mod = mod.rsplit(".", 1)[0]  # `from pkg.mod import name`: the module is pkg.mod
        key = rank_key(mod)
        if key is None or key == own:
            continue
        if own == SIDE:
            ok = RANKS[key] is not None and RANKS[key] <= SIDE_MAY_IMPORT
        elif key == SIDE:
            ok = RANKS[own] == 9
        else:
            ok = RANKS[key] <= RANKS[own]
        if not ok and not any(f"{name}:{line} imports {mod} " in b for b in bad):
            bad.append(f"{name}:{line} imports {mod} ({own or 'package'} must not depend on {key or 'package'})")
    return bad


def test_every_import_points_down_the_pipeline():
    bad = [v for name, f in modules() for v in violations(name, f.read_text(), f.name == "__init__.py")]
    assert not bad, "imports against the data flow:\n" + "\n".join(bad)


@pytest.mark.parametrize("name, source", [
    ("s2dit_deploy.quant.evaluate", "def f():\n    from s2dit_deploy.fidelity import psnr\n"),
    ("s2dit_deploy.quant.qnn", "def f():\n    from s2dit_deploy.targets.qnn.lower import resolve_soc\n"),
    ("s2dit_deploy.targets.qnn.calibration", "from ...fidelity import record_inputs\n"),
    ("s2dit_deploy.model_zoo.pipeline", "import s2dit_deploy.stages\n"),
    ("s2dit_deploy.reference_training.data", "from s2dit_deploy.quant import plan\n"),
    ("s2dit_deploy.targets.base", "from s2dit_deploy.reference_training import data\n"),
])
def test_the_scan_catches_an_upward_import(name, source):
    """The imports this test exists to forbid (as found in issue 16) are reported, lazy or not."""
    assert violations(name, source)


def quant_graph() -> dict[str, set[str]]:
    mods = {name: f for name, f in modules() if name.startswith(f"{PKG}.quant")}
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, f in mods.items():
        for mod, _ in imports(name, f.read_text(), f.name == "__init__.py"):
            while mod not in mods and "." in mod:
                mod = mod.rsplit(".", 1)[0]
            if mod in mods and mod != name and mod != f"{PKG}.quant":
                graph[name].add(mod)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path, or None (iterative colouring DFS)."""
    state: dict[str, int] = {}
    for start in sorted(graph):
        if start in state:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
                path.append(nxt)
    return None


def test_quant_has_no_import_cycle():
    cycle = find_cycle(quant_graph())
    assert cycle is None, "quant/ import cycle: " + " -> ".join(m.rsplit(".", 1)[-1] for m in cycle)


BACKENDS = {f"{PKG}.quant.{b}" for b in ("coreml", "qnn", "onnx", "xnnpack")}


def test_quant_backends_do_not_import_each_other():
    """A plan translation shares helpers through quant.layer_names, not another backend's module."""
    graph = quant_graph()
    bad = sorted(f"{a} -> {b}" for a in BACKENDS for b in graph.get(a, ()) if b in BACKENDS)
    assert not bad, bad


def test_the_cycle_finder_finds_a_lazy_cycle():
    assert find_cycle({"plan": {"capture"}, "capture": {"size"}, "size": {"plan"}}) is not None
    assert find_cycle({"allocate": {"plan"}, "plan": {"schemes"}, "schemes": set()}) is None
