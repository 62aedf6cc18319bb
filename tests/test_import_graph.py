"""The product's import graph, computed from the source: one namespace, no cycles, imports at the top.

Every module of the six installed packages is parsed; an import of ``diffsteer.a.b.c`` is an edge to that
module and to the packages above it (importing a submodule runs its packages' ``__init__``). The graph must
have no cycle, nothing may import the bare top-level names (``guidance``, ``service``, ...) that the package-dir
mapping no longer installs, and imports of our own modules sit at module level, except in the console
script's dispatch (``service/cli.py``), which loads a subcommand's modules only when that subcommand runs.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("guidance", "service", "rewards", "training", "evaluation", "proving_ground")
LAZY_IMPORTS_ALLOWED = {"diffsteer.service.cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["diffsteer", *parts])


def product_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement loads (for ``from m import x``: ``m.x``, which is a module or not)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def with_parents(name: str, modules: dict[str, Path], importer: str) -> set[str]:
    """The product modules that importing ``name`` from ``importer`` executes: it (or its longest module prefix)
    and the packages above it that do not hold ``importer`` (those are already being imported)."""
    parts = name.split(".")
    prefixes = {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
    return {p for p in prefixes if p in modules and not importer.startswith(p + ".")}


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]], list[tuple[str, int, str]]]:
    """(edges, function-level imports of our modules, imports of bare top-level names)."""
    modules = product_modules()
    edges: dict[str, set[str]] = defaultdict(set)
    lazy: list[tuple[str, int, str]] = []
    bare: list[tuple[str, int, str]] = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for name in imported_names(node, module, path.name == "__init__.py"):
                if name.split(".")[0] in PACKAGES:
                    bare.append((module, node.lineno, name))
                    continue
                targets = with_parents(name, modules, module) - {module}
                edges[module] |= targets
                if targets and id(node) not in top and module not in LAZY_IMPORTS_ALLOWED:
                    lazy.append((module, node.lineno, name))
    return edges, lazy, bare


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    nodes = sorted(set(edges) | {t for ts in edges.values() for t in ts})
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_product():
    edges, _, _ = import_graph()
    assert len(edges) > 50  # the graph was read
    assert cycles(edges) == []


def test_imports_of_our_modules_are_at_module_level():
    _, lazy, _ = import_graph()
    assert lazy == []


def test_nothing_imports_a_bare_top_level_name():
    _, _, bare = import_graph()
    assert bare == []


def test_documented_arrows_between_packages():
    """The package-level arrows docs/architecture.md draws: rewards imports nothing of ours, guidance only
    rewards and the proving ground's shipped paths; outside training, only the console script and the proving
    ground's builders (their options come from training's config machinery) import it."""
    edges, _, _ = import_graph()
    arrows: dict[str, set[str]] = defaultdict(set)
    for source, targets in edges.items():
        for target in targets:
            a, b = source.split(".")[1], target.split(".")[1]
            if a != b:
                arrows[a].add(b)
    assert arrows["rewards"] == set()
    assert arrows["guidance"] <= {"rewards", "proving_ground"}
    assert arrows["proving_ground"] <= {"guidance", "rewards", "training"}
    assert arrows["evaluation"] <= {"guidance", "rewards", "proving_ground"}
    assert "training" not in arrows["guidance"] | arrows["evaluation"] | arrows["rewards"]
    importers_of_training = {s for s, ts in edges.items() if any(t.startswith("diffsteer.training") for t in ts)}
    builders = (
        "diffsteer.proving_ground.build_model",
        "diffsteer.proving_ground.build_clip",
        "diffsteer.proving_ground.build_flow_model",
    )
    allowed = {"diffsteer.service.cli", *builders}
    assert {s for s in importers_of_training if not s.startswith("diffsteer.training")} <= allowed
    for builder in builders:
        assert {t for t in edges[builder] if t.startswith("diffsteer.training")} <= {
            "diffsteer.training",
            "diffsteer.training.config_io",
        }
