"""The import graph between vtprune's rooms, its cycles, and imports that run against the layering.

    python scripts/import_graph.py [PACKAGE_DIR]      # default: vtprune/ next to this script

A room is a top-level module or sub-package of vtprune (``api``, ``runtime``, ``methods``...). Every
``import``/``from ... import`` is counted, at module level or inside a function (a lazy import is still a
dependency); ``if TYPE_CHECKING:`` blocks are not. Layers, lowest first: a room may import its own layer
and the layers below, never a layer above.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LAYERS = [
    {"errors", "kernels"},
    {"config"},
    {"registry"},
    {"runtime"},
    {"methods", "integrations"},
    {"api", "__init__"},
    {"speed", "testing", "tune", "toy", "eval", "viz"},
    {"cli"},
]
RANK = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


def _room(path: Path, root: Path) -> str:
    rel = path.relative_to(root).parts
    return rel[0].removesuffix(".py") if len(rel) == 1 else rel[0]


def _targets(node: ast.AST, path: Path, root: Path) -> list[str]:
    """vtprune rooms an import statement names."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names if a.name.split(".")[0] == "vtprune"]
        return [n.split(".")[1] if "." in n else "__init__" for n in names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level == 0:
        parts = (node.module or "").split(".")
        if parts[0] != "vtprune":
            return []
        return [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
    package = path.parent.relative_to(root).parts
    base = package[: len(package) - (node.level - 1)]
    if node.level - 1 > len(package):
        return []
    module = [*base, *(node.module.split(".") if node.module else [])]
    if module:
        return [module[0]]
    return [a.name for a in node.names]  # "from . import x" at the package root


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def graph(root: Path) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        room = _room(path, root)
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            for target in _targets(node, path, root):
                known = (root / f"{target}.py").exists() or (root / target).is_dir()
                if target != room and known:
                    edges.setdefault(room, set()).add(target)
        edges.setdefault(room, set())
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one room (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted(
        (a, b)
        for a, targets in edges.items()
        for b in targets
        if a in RANK and b in RANK and RANK[b] > RANK[a]
    )


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "vtprune"
    edges = graph(root)
    for room in sorted(edges):
        print(f"{room:14s} -> {', '.join(sorted(edges[room])) or '-'}")
    found = cycles(edges)
    print("cycles:", found or "none")
    print("upward imports:", upward(edges) or "none")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
