"""The import graph of mka_edge (issue 24): no cycle, and no import against the declared direction
(docs/architecture.md's ``tiers`` block).  Imports inside functions count: a lazy import still ties
the modules together.  Pure AST, no module is imported."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "mka_edge"


def modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the mka_edge modules it imports (``from .x import y`` counts y when it is a module)."""
    mods = modules()
    graph = {}
    for m, f in mods.items():
        pkg = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ImportFrom):
                base = pkg[: len(pkg) - node.level + 1] if node.level else []
                name = ".".join(base + ([node.module] if node.module else []))
                for a in node.names:
                    full = f"{name}.{a.name}"
                    deps.add(full if full in mods else name)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[m] = {d for d in deps if d in mods and d != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(root):
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def tiers() -> dict[str, int]:
    """docs/architecture.md's tiers: top-level module or package -> rank (0 = the top)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"```tiers\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ```tiers block"
    return {name: i for i, line in enumerate(block.group(1).splitlines()) for name in line.split()}


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mka_edge"


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + " | ".join(" <-> ".join(c) for c in found)


def test_imports_follow_the_declared_direction():
    rank, graph = tiers(), import_graph()
    unlisted = sorted({top(m) for m in graph} - set(rank))
    assert not unlisted, f"not in docs/architecture.md's tiers: {unlisted}"
    upward = [f"{m} -> {d}" for m, ds in sorted(graph.items()) for d in sorted(ds) if rank[top(d)] < rank[top(m)]]
    assert not upward, "imports against the declared direction: " + "; ".join(upward)


def test_the_checks_catch_what_they_are_for():
    """The cycle finder finds a planted loop, and an upward edge is seen as one."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    rank = tiers()
    assert rank["cli"] < rank["solver"] < rank["errors"]
    graph = import_graph()
    assert "mka_edge.solver.cost_models" in graph["mka_edge.solver.search"]  # the registry, not targets
    assert "mka_edge.solver.cost_models" in graph["mka_edge.targets.base"]
