"""The code stays readable: no module over ~400 lines, no function over ~80 (issue 10's rule),
measured on the package source. A failure names the module or function to split."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "loraswitch"
MAX_MODULE_LINES = 420  # "about 400"
MAX_FUNCTION_LINES = 80
MODULES = sorted(p for p in SRC.rglob("*.py") if "libraries" not in p.parts)


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_module_and_function_size(path):
    text = path.read_text()
    n = len(text.splitlines())
    assert n <= MAX_MODULE_LINES, f"{path.relative_to(SRC)} has {n} lines (split it: ~400 at most)"
    long = [(f.name, f.end_lineno - f.lineno + 1) for f in _functions(ast.parse(text))
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.relative_to(SRC)}: functions over {MAX_FUNCTION_LINES} lines: {long}"
