"""The shape of the code base that docs/architecture.md describes, checked so that it cannot drift.

- the library (everything outside ``clipvip.apps``) never imports an app;
- the project's own modules are imported at module level, so the dependency graph reads off the
  top of each file (the ``clipvip`` command's dispatcher is the one place that imports an app by
  name when its command runs);
- the library's module graph has no cycles;
- defaults live only in ``clipvip.config.DEFAULTS``: no ``cfg.get(key, default)`` elsewhere.
"""
from __future__ import annotations

import ast
import functools
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "src" / "clipvip"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_app(name: str) -> bool:
    return name == "clipvip.apps" or name.startswith("clipvip.apps.") or name == "clipvip.__main__"


def imported_modules(tree: ast.AST, top_level_only: bool) -> list[tuple[str, int]]:
    """(project module, line) of the import statements in ``tree``; ``from clipvip.x import y``
    counts as ``clipvip.x.y`` where that is a module, else as ``clipvip.x``."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.startswith("clipvip")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clipvip") and not node.level:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.append((full if full in MODULES else node.module, node.lineno))
    return found


def function_level_imports(tree: ast.AST) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in node.body:
                found += imported_modules(ast.Module(body=list(ast.walk(inner)), type_ignores=[]), False)
    return sorted(set(found))


def parsed(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(encoding="utf-8"), filename=str(MODULES[name]))


def test_the_package_has_both_sides():
    assert any(is_app(m) for m in MODULES) and any(not is_app(m) for m in MODULES)
    for name in ("clipvip.model.layers", "clipvip.data.loader", "clipvip.engine.trainer", "clipvip.apps.retrieval"):
        assert name in MODULES, name


@pytest.mark.parametrize("name", [m for m in MODULES if not is_app(m)])
def test_the_library_never_imports_an_app(name):
    tree = parsed(name)
    offending = [(m, line) for m, line in imported_modules(tree, top_level_only=False) if is_app(m)]
    assert not offending, f"{MODULES[name]} imports apps: {offending}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_project_imports_are_at_module_level(name):
    local = function_level_imports(parsed(name))
    assert not local, f"{MODULES[name]}: function-level imports of project modules {local}"


def test_the_library_has_no_import_cycles():
    graph = {name: sorted({m for m, _ in imported_modules(parsed(name), top_level_only=True) if m in MODULES})
             for name in MODULES if not is_app(name)}
    cycles, state = [], {}  # state: 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


CONFIG_GET = re.compile(r"\b(?:cfg|config|dataset_cfg|entry)\.get\(")


@pytest.mark.parametrize("name", [m for m in MODULES if m != "clipvip.config"])
def test_no_config_defaults_outside_config(name):
    lines = MODULES[name].read_text(encoding="utf-8").splitlines()
    offending = [f"{i}: {line.strip()}" for i, line in enumerate(lines, 1) if CONFIG_GET.search(line)]
    assert not offending, f"{MODULES[name]} restates config defaults: {offending}"


def is_hf(name: str) -> bool:
    return name == "clipvip.hf" or name.startswith("clipvip.hf.")


# The Hugging Face classes (clipvip.hf) sit above the model; the package's __init__ imports them
# only to register them with transformers' Auto classes, and clipvip.integrations (MTEB) is built on
# them. Weights references (file, folder, Hub id) are resolved below the model, in clipvip.weights_ref.
BELOW_HF = [m for m in MODULES if not (is_app(m) or is_hf(m) or m == "clipvip" or m.startswith("clipvip.integrations"))]


@functools.lru_cache(maxsize=None)
def import_graph() -> dict[str, set[str]]:
    """Each module's project imports, at any level."""
    return {m: {n for n, _ in imported_modules(parsed(m), top_level_only=False) if n in MODULES or is_hf(n)}
            for m in MODULES}


@pytest.mark.parametrize("name", BELOW_HF)
def test_nothing_below_the_hf_classes_reaches_them(name):
    graph = import_graph()
    seen, todo, via = set(), [name], {name: None}
    while todo:
        module = todo.pop()
        for nxt in graph.get(module, ()):
            if nxt not in seen:
                seen.add(nxt)
                via[nxt] = module
                todo.append(nxt)
    reached = sorted(m for m in seen if is_hf(m))
    if reached:
        chain, node = [], reached[0]
        while node is not None:
            chain.append(node)
            node = via[node]
        pytest.fail(f"{name} imports the Hugging Face layer: {' <- '.join(chain)}")


def test_the_hf_rule_sees_an_import():
    """The rule above finds a module's import of clipvip.hf (else it could pass by reading nothing)."""
    tree = ast.parse("from clipvip.hf.hub import push_folder\nimport clipvip.hf\n")
    assert {m for m, _ in imported_modules(tree, top_level_only=False)} == {"clipvip.hf.hub", "clipvip.hf"}
    assert "clipvip.model.weights" in BELOW_HF and "clipvip.weights_ref" in BELOW_HF
    assert not any(is_hf(m) for m in BELOW_HF)
