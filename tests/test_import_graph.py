"""No import cycles among the modules of `workbench/`.

The graph is read from the source (ast), so nothing is imported: an edge A -> B for every `import B` /
`from B import ...` in A, at module level or inside a function (a lazy import hides a cycle, it does not
remove it), except under `if TYPE_CHECKING:`. A package's `__init__` is a module like any other; the
implicit "a submodule loads its package first" is not an edge (every package would be a cycle then).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("workbench",)

# Cycles other helpers are still removing: (frozenset of modules) -> why it is tolerated for now.
# Empty is the goal; each entry must still be a cycle (the test fails on a stale entry too).
KNOWN_CYCLES: dict[frozenset, str] = {}


def module_files() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        package = module if is_package else module.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base_parts = package.split(".")
                    base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = []
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                # `import a.b.c` names a.b.c; attribute the edge to the longest known module prefix.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    result = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
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
                    result.append(sorted(component))
    return result


def test_the_graph_sees_known_edges():
    graph = import_graph()
    assert "workbench.common" in graph["workbench.checkpoints.layout"]
    assert "workbench.backend.control_plane.core" in graph["workbench.backend.control_plane.jobs"]
    assert graph["workbench.common"] == set()  # the bottom of the graph


def test_no_import_cycles():
    found = [frozenset(c) for c in cycles(import_graph())]
    unexpected = [sorted(c) for c in found if c not in KNOWN_CYCLES]
    stale = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not unexpected, "import cycles among workbench modules:\n" + "\n".join(" <-> ".join(c) for c in unexpected)
    assert not stale, f"KNOWN_CYCLES lists cycles that are gone; remove them: {stale}"


def test_control_plane_routes_never_import_the_app():
    graph = import_graph()
    for route in ("jobs", "deployments", "checkpoints", "gateway", "core"):
        assert "workbench.backend.control_plane.app" not in graph[f"workbench.backend.control_plane.{route}"], route
