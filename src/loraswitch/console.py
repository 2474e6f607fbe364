"""What every command shares: the options that pick a base, a library and its routers, the
quiet set-up, opening a `Switch` with refusals reported, and a clear error exit. The command
modules (`cli`, `server.cli`, `eval.cli`, `merging.cli`, `bench.cli`, `demo.cli`) all use it, so
`--library bigbench` means the same everywhere and no command reaches into another's module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from loraswitch.constants import DEFAULT_LIBRARY, LIBRARY_NAMES

console = Console(stderr=True)

BaseOpt = Annotated[str | None, typer.Option("--base", help="Model directory or .gguf file (default: embedded SmolLM2-135M-Instruct).")]
DirsOpt = Annotated[list[Path] | None, typer.Option("--adapter-dir", help="Folder of PEFT LoRA adapters (repeatable; default: the --library's adapters).")]
RouterDirOpt = Annotated[Path | None, typer.Option("--router-dir", help="Folder of trained routers (default: the --library's routers).")]
LibraryOpt = Annotated[str, typer.Option("--library", help=f"Embedded library: {' | '.join(LIBRARY_NAMES)} (used where --adapter-dir / --router-dir are not given).")]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error (no traceback) and return the Exit to raise."""
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def library_paths(library: str, dirs: list[Path] | None, router_dir: Path | None) -> tuple[list[Path], Path]:
    """The adapter folders and router folder a command uses: explicit ones win, else the library's."""
    from loraswitch.constants import UnknownLibraryError, adapter_dir
    from loraswitch.constants import router_dir as library_router_dir

    for given, what in [*((d, "adapter folder") for d in dirs or ()), *([(router_dir, "router folder")] if router_dir else [])]:
        if not Path(given).exists():  # a typo must not quietly answer with the base model (or with Arrow)
            raise fail(f"{what} {str(given)!r} does not exist")
        if not Path(given).is_dir():
            raise fail(f"{what} {str(given)!r} is a file; give the folder that holds the adapters")
    try:
        return (list(dirs) if dirs else [adapter_dir(library)]), (router_dir or library_router_dir(library))
    except UnknownLibraryError as exc:
        raise fail(str(exc)) from None


def quiet() -> None:
    """Keep stdout clean for --json: transformers' progress bars and warnings go nowhere; torch
    uses LORASWITCH_THREADS threads (default: every core)."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(int(os.environ.get("LORASWITCH_THREADS", os.cpu_count() or 1)))


def open_switch(base: str | None, dirs: list[Path] | None, router_dir: Path | None = None,
                library: str = DEFAULT_LIBRARY):
    """A `Switch` on `base` with the library's (or the given) adapters and routers; refused
    adapters are reported, an unloadable base model is a clean exit 2."""
    quiet()
    from loraswitch.base import BaseModelError
    from loraswitch.switch import Switch

    adapter_dirs, routers = library_paths(library, dirs, router_dir)
    try:
        switch = Switch(base, adapter_dirs, routers)
    except BaseModelError as exc:
        raise fail(str(exc)) from None
    for name, err in switch.engine.errors.items():
        console.print(f"[yellow]refused adapter[/yellow] {name}: {err.reason}")
    if not switch.engine.adapters and not switch.engine.errors:  # a mistyped --adapter-dir says so
        where = ", ".join(map(str, adapter_dirs)) or "no folder"
        console.print(f"[yellow]warning[/yellow] no adapters found in {where}: every answer comes from the base model")
    return switch
