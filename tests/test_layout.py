"""The shape of the package: no import cycles between threadflow's modules.

A cycle (even one hidden in a function-level import) means two modules share an idea; the
design keeps them layered: definition and events at the bottom, the coordinator over the
store, the Flow class and the command line on top.
"""

import ast
import graphlib
from pathlib import Path

import threadflow

PACKAGE = Path(threadflow.__file__).parent


def _is_type_checking(node):
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path):
    """The threadflow modules ``path`` imports at run time, anywhere in it (function-level
    imports included; ``if TYPE_CHECKING:`` blocks left out, as they never run)."""
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.split(".")[0] == "threadflow":
                parts = node.module.split(".")
                if len(parts) > 1:
                    found.add(parts[1])
                else:
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "threadflow" and len(parts) > 1:
                    found.add(parts[1])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def module_graph():
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        if name == "__init__":
            continue  # re-exports only: it imports everything, nothing imports it
        graph[name] = {m for m in _imports(path) if m in modules and m not in ("__init__", name)}
    return graph


def test_the_package_has_no_import_cycle():
    graph = module_graph()
    assert "coordinator" in graph and "flow" in graph  # the walk found the modules
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        cycle = " -> ".join(exc.args[1])
        raise AssertionError(f"threadflow modules import each other in a cycle: {cycle}") from None
    assert order.index("events") < order.index("store") < order.index("coordinator")
    assert order.index("coordinator") < order.index("flow") < order.index("cli")


def test_the_cycle_check_sees_function_level_imports(tmp_path):
    # A guard on the check itself: an import inside a function counts.
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from .flow import Flow\n    return Flow\n")
    assert _imports(source) == {"flow"}
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import x\n")
    assert _imports(source) == set()


def test_no_module_imports_another_modules_private_names():
    # Private helpers stay in their module; what another module needs is public there.
    # (__init__ re-exports _registry_servers for the test suite's clean-up fixture.)
    offenders = []
    for path in PACKAGE.glob("*.py"):
        if path.stem == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                offenders += [
                    f"{path.stem} imports {node.module}.{alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_") and not alias.name.startswith("__")
                ]
    assert offenders == []
