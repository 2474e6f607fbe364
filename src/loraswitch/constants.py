"""Where the embedded libraries live, so that no core module has to import the demo to find them.

A library is a folder `libraries/<name>/` inside the package with `adapters/` (PEFT LoRA folders
and a `manifest.json`) and `routers/` (trained routers). `demo` is the synthetic eight-task
library; `bigbench` the real-task library built from BIG-bench.
"""

from __future__ import annotations

from pathlib import Path

LIBRARIES_DIR = Path(__file__).resolve().parent / "libraries"
DEFAULT_LIBRARY = "demo"
LIBRARY_NAMES = ("demo", "bigbench")


class UnknownLibraryError(ValueError):
    """A library name that is not one of the embedded libraries."""


def library_dir(name: str = DEFAULT_LIBRARY) -> Path:
    """The folder of an embedded library (`demo` or `bigbench`)."""
    if name not in LIBRARY_NAMES:
        raise UnknownLibraryError(f"unknown library {name!r}; embedded libraries: {', '.join(LIBRARY_NAMES)}")
    return LIBRARIES_DIR / name


def adapter_dir(name: str = DEFAULT_LIBRARY) -> Path:
    """The adapters of an embedded library."""
    return library_dir(name) / "adapters"


def router_dir(name: str = DEFAULT_LIBRARY) -> Path:
    """The trained routers of an embedded library."""
    return library_dir(name) / "routers"


DEMO_ADAPTER_DIR = adapter_dir("demo")
DEMO_ROUTER_DIR = router_dir("demo")
