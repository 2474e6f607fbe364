"""Lazy package exports: a package names what it offers, and each name is imported on first use.

Why: `loraswitch --help` imports every command's module to build the help text; if the packages
behind them imported torch and transformers at import time, the help would take seconds. With
this, a package `__init__` costs nothing until one of its names is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """A module `__getattr__` and `__all__` for `package`: name -> submodule it lives in."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    return __getattr__, sorted(exports)
