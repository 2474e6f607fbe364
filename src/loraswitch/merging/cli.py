"""`loraswitch merge CONFIG OUT_DIR`: typer-ready command that runs a merge YAML end to end.

Thin on purpose, like the main CLI: validate the YAML (before any model is loaded, so a typo
fails in a second), load the base and adapters, merge, export, print a summary. Messages go to
stderr through rich; the last stdout line is the path of `merge_report.json`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(2)


def merge_command(
    config: Annotated[Path, typer.Argument(help="Merge YAML: method, adapters (+weights), parameters, output.")],
    out_dir: Annotated[Path, typer.Argument(help="Output folder (an adapter folder, or a model folder with output.format: model).")],
    base: Annotated[str | None, typer.Option("--base", help="Model directory or .gguf file (overrides the YAML's base; default: embedded SmolLM2-135M-Instruct).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT_DIR when it holds an earlier merge's output (never a folder that holds an input, the config or other files).")] = False,
) -> None:
    """Merge several LoRA adapters into one (linear, ties, dare_linear, dare_ties, pcb, adamerging)."""
    from loraswitch.base import BaseModelError, load_base
    from loraswitch.library import AdapterError, validate_name
    from loraswitch.merging.config import ConfigError, load_config
    from loraswitch.merging.export import export_adapter, export_model
    from loraswitch.merging.merge import load_adapters, run_merge

    if os.environ.get("LORASWITCH_THREADS"):  # same knob as the main CLI
        import torch

        torch.set_num_threads(int(os.environ["LORASWITCH_THREADS"]))
    try:
        cfg = load_config(config)
        if cfg.output.format == "adapter":
            validate_name(out_dir.resolve().name)  # the folder name is the merged adapter's name in loraswitch
        _check_output(out_dir, [a.path for a in cfg.adapters] + [config], force)
    except (ConfigError, AdapterError, ValueError) as exc:
        raise _fail(str(exc)) from None
    console.print(f"[bold]merge[/bold] {cfg.method}: " + ", ".join(f"{a.name} x{a.weight:g}" for a in cfg.adapters))
    try:
        base_model = load_base(base or cfg.base)
        adapters = load_adapters(cfg, base_model)
    except (BaseModelError, AdapterError) as exc:
        raise _fail(str(exc)) from None
    for a in adapters:
        for warning in a.warnings:
            console.print(f"[yellow]warning[/yellow] {a.name}: {warning}")
    result = run_merge(cfg, base_model, adapters)
    if result.adamerging is not None:
        _print_adamerging(result.adamerging)
    if force and out_dir.exists():
        shutil.rmtree(out_dir)
    try:
        if cfg.output.format == "model":
            report = export_model(result, out_dir, base_model)
            console.print(f"[green]wrote merged model[/green] {out_dir} ({report['n_modules']} modules updated, exact)")
        else:
            report = export_adapter(result, out_dir, cfg.output.rank, base_model)
            _print_reconstruction(report)
            console.print(f"[green]wrote merged adapter[/green] {out_dir} (rank {report['output']['rank']})")
    except OSError as exc:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise _fail(f"cannot write {out_dir}: {exc.strerror or exc}") from None
    except BaseException:  # interrupted or failed: no half-written folder is left to look like an adapter
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    print(out_dir / "merge_report.json")


def _check_output(out_dir: Path, inputs: list[Path | None], force: bool) -> None:
    """Refuse, before any model loads, an output that would lose something or cannot be written:
    a file, a folder that is or holds an input (an adapter being merged, the config) or the
    working directory, a folder that holds files (without --force; with it, only an earlier
    merge's output, which holds `merge_report.json`, is replaced: a review's `--force` into the
    library folder deleted every adapter in it), a place where no folder can be made."""
    out = out_dir.resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder")
    for p in (Path(p).resolve() for p in inputs if p is not None):
        if p == out or out in p.parents:
            what = "the merge config" if p.is_file() else "an adapter being merged"
            raise ValueError(f"{out_dir} {'is' if p == out else 'holds'} {what} ({p}); write the merge to another folder")
    if out == Path.cwd().resolve() or out in Path.cwd().resolve().parents:
        raise ValueError(f"{out_dir} is or holds the working directory; write the merge to a folder of its own")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ValueError(f"{out_dir} already holds files; choose a new folder, or pass --force to replace "
                             "an earlier merge's output")
        if not (out / "merge_report.json").is_file():
            raise ValueError(f"{out_dir} holds files that are not an earlier merge's output (no merge_report.json); "
                             "--force only replaces one: choose a new folder")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot create {out_dir}: {parent} is not a writable folder")


def _print_reconstruction(report: dict) -> None:
    rec = report["reconstruction"]
    worst = sorted(rec["modules"].items(), key=lambda kv: -kv[1]["relative_error"])[:5]
    table = Table("module", "relative error", "exact rank", title="SVD reconstruction, worst modules")
    for key, m in worst:
        table.add_row(key, f"{m['relative_error']:.2e}", str(m["exact_rank"]))
    console.print(table)
    console.print(
        f"relative error ||dW - BA||/||dW||: overall {rec['overall_relative_error']:.3e}, "
        f"mean {rec['mean_relative_error']:.3e}, max {rec['max_relative_error']:.3e} at rank {report['output']['rank']}"
    )


def _print_adamerging(info: dict) -> None:
    groups = info["coefficients"]
    adapters = list(next(iter(groups.values())))
    table = Table("group", *adapters, title=f"AdaMerging coefficients ({info['granularity']}-wise)")
    shown = list(groups.items())[:40]
    for group, row in shown:
        table.add_row(group, *(f"{row[a]:.3f}" for a in adapters))
    console.print(table)
    if len(groups) > len(shown):
        console.print(f"... {len(groups) - len(shown)} more groups in merge_report.json")
    console.print(f"prediction entropy {info['entropy_before']:.4f} -> {info['entropy_after']:.4f} nats "
                  f"({info['n_prompts']} unlabeled prompts)")
