"""The house rules that a reader cannot check at a glance hold everywhere (STYLE.md).

Modules of ``maildrop`` and ``compat`` of at most 400 lines and functions of at most 60
lines; a module map in ``maildrop/__init__.py`` that names every module of the package and no
module that is gone; every ``pytest.raises`` in ``tests/`` and ``benchmarks/`` pins what it
expects: a ``match=`` (``r"^$"`` for an exception that carries no message, e.g.
``CancelledError``), or the exception info bound with ``as`` and inspected in the test
(an attribute such as ``smtp_code``, or ``.match()`` where the type varies by backend).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import compat
import maildrop

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60

PACKAGES = [Path(maildrop.__file__).parent, Path(compat.__file__).parent]
MODULES = sorted(p for pkg in PACKAGES for p in pkg.glob("*.py"))
ROOT = PACKAGES[0].parent
TESTS = sorted([*(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").glob("test_*.py")])


def _name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def long_functions(source: str, limit: int) -> list[tuple[str, int]]:
    """Return ``(name, lines)`` of each function or method in *source* longer than *limit*."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            assert node.end_lineno is not None  # set by ast.parse
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found.append((node.name, lines))
    return found


def test_the_checker_finds_a_long_function() -> None:
    """long_functions() names a function over the limit, with decorators left out, and no other."""
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    source = f"def short():\n    pass\n\n@dec\nasync def long():\n{body}\n"
    assert long_functions(source, MAX_FUNCTION_LINES) == [("long", 61)]


def test_both_packages_are_found() -> None:
    """The walk sees both packages' modules (a wrong path would make the checks vacuous)."""
    names = {_name(p) for p in MODULES}
    assert {"maildrop/_session.py", "compat/_task.py"} <= names


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_module_is_at_most_400_lines(path: Path) -> None:
    """Each module has at most 400 lines."""
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{_name(path)} has {lines} lines"


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_functions_are_at_most_60_lines(path: Path) -> None:
    """Each function and method has at most 60 lines (decorators not counted)."""
    assert long_functions(path.read_text(encoding="utf-8"), MAX_FUNCTION_LINES) == []


def _map_names() -> set[str]:
    doc = maildrop.__doc__
    assert doc is not None
    return set(re.findall(r"(?<![\w.])_?[a-z][a-z_]*\*?", doc))


def test_module_map_names_every_module() -> None:
    """The package docstring names every module of ``maildrop`` (``_uring*``: a family)."""
    names = _map_names()
    families = [n[:-1] for n in names if n.endswith("*")]
    modules = {p.stem for p in PACKAGES[0].glob("*.py")} - {"__init__", "__main__"}
    missing = {m for m in modules if m not in names and not m.startswith(tuple(families))}
    assert missing == set()


def test_module_map_names_no_module_that_is_gone() -> None:
    """Every private module name in the map is a module of ``maildrop``."""
    modules = {p.stem for p in PACKAGES[0].glob("*.py")}
    named = {n for n in _map_names() if n.startswith("_") and not n.endswith("*")}
    assert named - modules == set()


def unpinned_raises(source: str) -> list[int]:
    """Return the lines of each ``pytest.raises`` in *source* that pins nothing.

    It pins something with a ``match=``, or when it is bound (``as info``) and that name is
    read again in the same function.
    """
    found = []
    for func in ast.walk(ast.parse(source)):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(func):
            if not isinstance(node, ast.With | ast.AsyncWith):
                continue
            for item in node.items:
                call = item.context_expr
                if not (isinstance(call, ast.Call) and ast.unparse(call.func) == "pytest.raises"):
                    continue
                if any(k.arg == "match" for k in call.keywords):
                    continue
                bound = item.optional_vars
                if isinstance(bound, ast.Name) and _read_after(func, bound):
                    continue
                found.append(call.lineno)
    return found


def _read_after(func: ast.AST, bound: ast.Name) -> bool:
    return any(
        isinstance(n, ast.Name) and n.id == bound.id and isinstance(n.ctx, ast.Load)
        for n in ast.walk(func)
    )


def test_the_raises_checker_tells_pinned_from_unpinned() -> None:
    """A bare raises is reported; one with match=, or bound and inspected, is not."""
    source = (
        "def t():\n"
        "    with pytest.raises(E):\n        f()\n"
        "    with pytest.raises(E, match='x'):\n        f()\n"
        "    with pytest.raises(E) as info:\n        f()\n"
        "    assert info.value.code == 1\n"
        "    with pytest.raises(E) as unused:\n        f()\n"
    )
    assert unpinned_raises(source) == [2, 9]


@pytest.mark.parametrize("path", TESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_raises_pins_the_exception(path: Path) -> None:
    """Every ``pytest.raises`` has a ``match=`` or inspects the exception it caught."""
    assert unpinned_raises(path.read_text(encoding="utf-8")) == []
