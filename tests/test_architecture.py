"""Tests that guard the shape of the package (as trio's test_exports guards its surface):

- the import table of docs/architecture.md is the truth: each module imports exactly the
  greenserve modules its row lists;
- no module reaches into another module's private names, except through the one
  declared interface between ``Switch`` and the engine (``SWITCH_INTERFACE``) and in
  ``_gevent.py``, the one place that touches gevent's internals;
- functions stay short, and constructors take an options object rather than a dozen
  arguments.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "greenserve"
MODULES = sorted(p for p in PACKAGE.glob("*.py"))

# What the engine and the faces may call on a Switch beyond its public API (declared in
# greenserve/switch.py's docstring, "The engine's interface").
SWITCH_INTERFACE = {"_fork_owning", "_cancel_fiber", "_detached", "_close"}
# Private names of the standard library that are its documented way to do something.
STDLIB_PRIVATE = {("os", "_exit"), ("os", "_Environ")}
# The one module allowed to use gevent's private attributes.
GEVENT_BOUNDARY = "_gevent"

MAX_FUNCTION_LINES = 40   # a function's body, its docstring not counted
MAX_PARAMETERS = 8        # beyond that, an options object (private functions included)
# Public signatures that mirror another library's API one-to-one (changing them would
# break the users they exist for): Async's Tcp.Server.create / create_sock and gevent's
# StreamServer; run_server and serve_listeners take what tcp.Server takes.
MIRRORED_SIGNATURES = {"tcp.py:create", "tcp.py:create_sock", "server.py:__init__",
                       "net.py:run_server", "net.py:serve_listeners"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imported(tree: ast.Module) -> set[str]:
    """The greenserve modules a module imports (relative or absolute)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("greenserve."):
            found.add(node.module.split(".")[1])  # type: ignore[union-attr]
    return found


def _documented_table() -> dict[str, set[str]]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    table: dict[str, set[str]] = {}
    for line in text.splitlines():
        match = re.match(r"\| `(\w+)\.py` \|[^|]*\| (.*) \|$", line)
        if match:
            table[match.group(1)] = set(re.findall(r"`(\w+)`", match.group(2)))
    return table


def test_the_documented_import_table_is_what_the_code_imports() -> None:
    table = _documented_table()
    assert len(table) >= 15, "the import table of docs/architecture.md was not found"
    for path in MODULES:
        name = path.stem
        if name in ("__init__", "__main__", "_version"):
            continue
        assert name in table, f"{name}.py has no row in docs/architecture.md's table"
        imported = _imported(_tree(path))
        assert imported == table[name], (
            f"{name}.py imports {sorted(imported)}; the table says {sorted(table[name])}")


def test_the_layers_have_no_cycle() -> None:
    table = _documented_table()
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name in done:
            return
        for dep in table.get(name, ()):
            visit(dep, (*path, name))
        done.add(name)

    for name in table:
        visit(name, ())


def _own_names(tree: ast.Module) -> set[str]:
    """Private names a module defines itself: functions, classes, attributes it assigns
    (``self._x = ...``), class-level names and ``__slots__`` entries."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, (ast.Name, ast.arg)):
            names.add(node.id if isinstance(node, ast.Name) else node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # __slots__
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _private_uses(path: Path) -> list[str]:
    tree = _tree(path)
    own = _own_names(tree)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__") \
                        and node.module is not None:
                    bad.append(f"{path.name}:{node.lineno}: imports {node.module}.{alias.name}")
        if not isinstance(node, ast.Attribute):
            continue
        attr = node.attr
        if not attr.startswith("_") or attr.startswith("__"):
            continue
        value = node.value
        if isinstance(value, ast.Name) and value.id in ("self", "cls"):
            continue
        if isinstance(value, ast.Name) and (value.id, attr) in STDLIB_PRIVATE:
            continue
        if path.stem == GEVENT_BOUNDARY or attr in SWITCH_INTERFACE or attr in own:
            continue
        bad.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return bad


def test_no_module_reaches_into_another_modules_private_names() -> None:
    bad = [use for path in MODULES for use in _private_uses(path)]
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_the_switch_interface_is_declared_where_it_lives() -> None:
    doc = ast.get_docstring(_tree(PACKAGE / "switch.py")) or ""
    for name in SWITCH_INTERFACE:
        assert name in doc, f"switch.py's docstring does not declare {name}"


def _functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    found = []
    for path in MODULES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((f"{path.name}:{node.name}", node))
    return found


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
            and isinstance(first.value.value, str) and len(body) > 1:
        first = body[1]
    assert node.end_lineno is not None
    return node.end_lineno - first.lineno + 1


@pytest.mark.parametrize("limit", [MAX_FUNCTION_LINES])
def test_functions_are_short(limit: int) -> None:
    long = [f"{name} ({_body_lines(node)} lines)" for name, node in _functions()
            if _body_lines(node) >= limit]
    assert not long, f"functions of {limit} lines or more: {long}"


def test_constructors_and_helpers_take_few_parameters() -> None:
    def count(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
        args = node.args
        names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
        return len([n for n in names if n not in ("self", "cls")])

    many = [f"{name} ({count(node)})" for name, node in _functions()
            if count(node) > MAX_PARAMETERS and name not in MIRRORED_SIGNATURES]
    assert not many, f"more than {MAX_PARAMETERS} parameters: {many}"
