"""The package's shape: dependencies point one way, and the public imports keep working."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from tests.kit import ROOT

PACKAGE = ROOT / "mercli"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every mercli module `path` imports, at any depth of the file (type-only ones too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts]
    known = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, known) for p in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
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
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = import_graph()
    assert "mercli.spool.store" in graph and graph["mercli.spool.claims"]  # the graph is real
    assert cycles(graph) == []


def test_the_spool_items_module_is_a_leaf_of_the_spool() -> None:
    graph = import_graph()
    assert not {m for m in graph["mercli.spool.items"] if m.startswith("mercli.spool")}


@pytest.mark.parametrize(
    ("module", "names"),
    [
        ("mercli.spool", ["Spool", "Worker", "Claim", "Transaction", "recover", "INCOMING"]),
        ("mercli.tags", ["read_tags", "extract_tags", "UnreadableDicom", "SIDECAR_KEYWORDS"]),
        ("mercli.jobs", ["Target", "JobInfo", "Progress", "job_record", "DISPATCH_FILE"]),
        ("mercli.rules.config", ["load_rules", "RuleSet"]),
        ("mercli.dispatch.targets", ["DELIVER", "deliver", "Attempt"]),
    ],
)
def test_public_imports_keep_working(module: str, names: list[str]) -> None:
    imported = importlib.import_module(module)
    assert all(hasattr(imported, name) for name in names)


def test_every_target_type_rules_accept_has_a_delivery_module() -> None:
    from mercli.dispatch.targets import DELIVER
    from mercli.rules.config import TARGET_TYPES

    assert set(TARGET_TYPES) == set(DELIVER)
