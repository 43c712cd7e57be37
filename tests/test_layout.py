"""The layout the architecture section of README describes, held by tests: no import circle
between modules or packages (a lazy import inside a function counts: it is how circles hide),
the shared package imports none of its users, and the wheel lists every package."""

from __future__ import annotations

import ast
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (pyproject installs tomli there)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "chorus_p2p"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """What ``module`` imports from chorus_p2p, anywhere in the file except under
    ``if TYPE_CHECKING:`` (annotations only, never run)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree)
                   if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for n in ast.walk(block)}
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules and name != module}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one vertex (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            vertex, edges = work[-1]
            advanced = False
            for target in edges:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.get(target, ())))))
                    advanced = True
                    break
                if target in on_stack:
                    low[vertex] = min(low[vertex], index[target])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[vertex])
            if low[vertex] == index[vertex]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == vertex:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def _package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_through_others():
    assert _circles(_graph()) == []


def test_no_package_depends_on_another_in_a_circle():
    packages: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        packages.setdefault(_package_of(module), set()).update(
            _package_of(t) for t in targets if _package_of(t) != _package_of(module))
    assert _circles(packages) == []


def test_the_shared_package_imports_none_of_its_users():
    """``federation`` (spec, round states, refusals, DP policy and accountant) is what node,
    train, flower and the CLI agree on: if it imported one of them, a circle would follow."""
    users = {"chorus_p2p.node", "chorus_p2p.train", "chorus_p2p.flower", "chorus_p2p.cli",
             "chorus_p2p.client", "chorus_p2p.trust", "chorus_p2p.evaluation", "chorus_p2p.demos"}
    reached = {(module, target) for module, targets in _graph().items()
               if module.startswith("chorus_p2p.federation") for target in targets
               if _package_of(target) in users}
    assert reached == set()


def test_the_consensus_core_stands_alone():
    """The election's rules import nothing else of chorus_p2p: the node drives them, never the
    other way round (what they may import from the standard library is in
    test_consensus_core)."""
    reached = {(module, target) for module, targets in _graph().items()
               if module.startswith("chorus_p2p.consensus") for target in targets
               if _package_of(target) != "chorus_p2p.consensus"}
    assert reached == set()


def test_the_wheel_lists_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert on_disk - listed == set()


def test_the_old_import_paths_still_work_and_say_where_things_moved():
    import importlib
    import sys

    import pytest

    from chorus_p2p.federation.dp_policy import DPPolicy
    from chorus_p2p.federation.refusals import UpdateRejected
    from chorus_p2p.federation.spec import FederationSpec

    for name in ("chorus_p2p.node.spec", "chorus_p2p.node.dp_policy"):
        sys.modules.pop(name, None)
        with pytest.warns(DeprecationWarning, match=name.replace("node", "federation")):
            old = importlib.import_module(name)
        assert old.UpdateRejected is UpdateRejected
    assert sys.modules["chorus_p2p.node.spec"].FederationSpec is FederationSpec
    assert sys.modules["chorus_p2p.node.dp_policy"].DPPolicy is DPPolicy
