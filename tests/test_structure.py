"""The shape of the code, checked from its source: no import cycles, no private names across modules, small
modules and classes, flows that only wire. These are the rules of issue 12; a change that breaks one fails here."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("apollo_sync", "flows", "tasks")
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 250
MAX_FLOW_LINES = 60
MAX_FLOW_PARAMETERS = 8
LONG_MODULES_ALLOWED = ("apollo_sync.sandbox",)
"""The sandbox (a fake Apollo, not the product) may hold longer modules; it is still split by concern."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files(*, tests: bool = False) -> dict[str, Path]:
    roots = [*PACKAGES, *(("tests", "bench") if tests else ())]
    files = {}
    for root in roots:
        for path in sorted((ROOT / root).rglob("*.py")):
            files[module_name(path)] = path
    return files


MODULES = project_files()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved against ``importer``)."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package(importer) else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def walk_outside_type_checking(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, except those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path) -> Iterator[tuple[str, list[str], int]]:
    """(module, names imported from it, line) for every import in the file, top level or inside a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in walk_outside_type_checking(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            yield resolve(name, node), [alias.name for alias in node.names], node.lineno


def project_target(module: str, imported: list[str]) -> set[str]:
    """The project modules an import loads: the module itself, or the submodules ``from pkg import sub`` names."""
    submodules = {f"{module}.{item}" for item in imported if f"{module}.{item}" in MODULES}
    if module in MODULES and (not imported or len(submodules) < len(imported)):
        return submodules | {module}  # a name defined in the module (or its __init__) itself
    return submodules


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for module, imported, _ in imports_of(name, path):
            graph[name] |= project_target(module, imported) - {name}
    return graph


def test_no_import_cycles():
    graph = import_graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_a_submodule_never_imports_its_own_package():
    offenders = []
    for name, path in MODULES.items():
        for module, imported, line in imports_of(name, path):
            if is_package_of(module, name) and module in project_target(module, imported):
                offenders.append(f"{name}:{line} imports {module}")
    assert not offenders, offenders


def is_package_of(package: str, name: str) -> bool:
    return package in MODULES and is_package(package) and name.startswith(package + ".") and name != package


def test_no_private_name_is_imported_or_reached_across_modules():
    files = project_files(tests=True)
    offenders = []
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules_bound: set[str] = set()
        for module, imported, line in imports_of(name, path):
            for item in imported:
                if item.startswith("_") and not item.startswith("__"):
                    offenders.append(f"{name}:{line} imports {item} from {module}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = resolve(name, node) if name in MODULES else (node.module or "")
                modules_bound |= {a.asname or a.name for a in node.names if f"{base}.{a.name}" in MODULES}
            elif isinstance(node, ast.Import):
                modules_bound |= {a.asname or a.name for a in node.names if a.name in MODULES}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in modules_bound
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                offenders.append(f"{name}:{node.lineno} reaches {node.value.id}.{node.attr}")
            if (  # monkeypatch.setattr(module, "_private", ...)
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "setattr"
                and len(node.args) >= 2
                and isinstance(node.args[0], ast.Name)
                and node.args[0].id in modules_bound
                and isinstance(node.args[1], ast.Constant)
                and str(node.args[1].value).startswith("_")
            ):
                offenders.append(f"{name}:{node.lineno} patches {node.args[0].id}.{node.args[1].value}")
    assert not offenders, offenders


def test_modules_and_classes_stay_small():
    too_long = []
    for name, path in MODULES.items():
        source = path.read_text(encoding="utf-8")
        lines = source.count("\n") + 1
        if lines > MAX_MODULE_LINES and not name.startswith(LONG_MODULES_ALLOWED):
            too_long.append(f"module {name}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    too_long.append(f"class {name}.{node.name}: {size} lines")
    assert not too_long, too_long


def flow_functions() -> list[tuple[str, ast.AsyncFunctionDef | ast.FunctionDef]]:
    found = []
    for name, path in MODULES.items():
        if not name.startswith("flows."):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                (d.func if isinstance(d, ast.Call) else d).id == "flow"  # type: ignore[union-attr]
                for d in node.decorator_list
                if isinstance(d.func if isinstance(d, ast.Call) else d, ast.Name)
            ):
                found.append((name, node))
    return found


def test_there_are_flows_to_check():
    assert {f"{module}:{fn.name}" for module, fn in flow_functions()} >= {
        "flows.sync_contacts:sync_contacts",
        "flows.sync_partitions:sync_partitions",
    }


@pytest.mark.parametrize("module,fn", flow_functions(), ids=lambda v: getattr(v, "name", v))
def test_flow_functions_only_wire(module, fn):
    size = fn.end_lineno - fn.lineno + 1 - len(fn.decorator_list)
    parameters = len(fn.args.args) + len(fn.args.kwonlyargs)
    assert size <= MAX_FLOW_LINES, f"{module}:{fn.name} is {size} lines"
    assert parameters <= MAX_FLOW_PARAMETERS, f"{module}:{fn.name} takes {parameters} parameters"
