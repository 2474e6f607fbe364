"""`loraswitch eval`: a typer-ready command function, made by `make_eval_command(suite_for)` and
registered in `loraswitch.cli`, which passes the function that maps `--library` to its task suite
(the suites live in `loraswitch.demo`, which eval never imports). Progress and tables go to
stderr through rich; the last stdout line is the path of the main result file."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from loraswitch.console import LibraryOpt, library_paths

console = Console(stderr=True)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def make_eval_command(suite_for: Callable[[str], object]) -> Callable[..., None]:
    """The `eval` command, evaluating on `suite_for(--library)`, an `eval.suite.Suite`."""

    def eval_command(
        methods: Annotated[list[str] | None, typer.Option("--methods", "-m", help="Methods to run (repeatable or comma-separated; see --list).")] = None,
        tasks: Annotated[list[str] | None, typer.Option("--tasks", "-t", help="Tasks of the suite (repeatable or comma-separated; default: all).")] = None,
        limit: Annotated[int | None, typer.Option(min=1, help="Test prompts per task (and per composite size; 2x for out-of-suite).")] = None,
        quick: Annotated[bool, typer.Option("--quick", help="A small subset that runs in about a minute on a 2-core CPU.")] = False,
        out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("eval_results"),
        composite_limit: Annotated[int | None, typer.Option(min=0, help="Prompts per composite size (default: --limit).")] = None,
        composite: Annotated[list[int] | None, typer.Option("--composite", help="Composite sizes (default: the suite's; demo 2, 3, 5; bigbench 3, 5, 10).")] = None,
        freeform: Annotated[int | None, typer.Option("--freeform", min=0, help="Free-form composites per layout and size (demo: prose, bullets, tags, letters, ...; training vs held-out layouts).")] = None,
        xlora_limit: Annotated[int, typer.Option(min=1, help="At most this many prompts per task / set for peft_xlora (no KV cache).")] = 4,
        xlora_train: Annotated[int | None, typer.Option(min=1, help="Training prompts per adapter for X-LoRA's classifier (default 40; --quick 4).")] = None,
        xlora_epochs: Annotated[int | None, typer.Option(min=1, help="Epochs of X-LoRA's classifier training (default 3; --quick 1).")] = None,
        max_new_tokens: Annotated[int | None, typer.Option(min=1, help="New tokens per single-task answer.")] = None,
        batch_size: Annotated[int, typer.Option(min=1)] = 16,
        base: Annotated[str | None, typer.Option("--base", help="Model directory or .gguf file (default: embedded SmolLM2-135M-Instruct).")] = None,
        adapter_dir: Annotated[list[Path] | None, typer.Option("--adapter-dir", help="Adapter folder (repeatable; default: the --library's adapters).")] = None,
        router_dir: Annotated[Path | None, typer.Option("--router-dir", help="Trained routers (default: the --library's routers).")] = None,
        library: LibraryOpt = "demo",
        list_methods: Annotated[bool, typer.Option("--list", help="List the methods and exit.")] = False,
        resume: Annotated[bool, typer.Option("--resume", help="Reuse the methods an earlier run into --out finished on the same prompts (files are rewritten after every method).")] = False,
        doc: Annotated[Path | None, typer.Option("--doc", help="Also write the result tables into this markdown file (between generated markers), e.g. docs/evaluation.md.")] = None,
        readme: Annotated[Path | None, typer.Option("--readme", help="Also write the short summary into this markdown file, e.g. README.md.")] = None,
    ) -> None:
        """Quality: base, oracle, routers, merges and PEFT baselines on a library's task suite."""
        from loraswitch.eval.harness import EvalConfig, run_eval
        from loraswitch.eval.registry import registry

        reg = registry()
        if list_methods:
            table = Table("method", "family", "what")
            for name, spec in reg.items():
                table.add_row(name, spec.family, spec.description)
            Console().print(table)
            return
        _quiet()
        dirs, routers = library_paths(library, adapter_dir, router_dir)
        try:
            suite = suite_for(library)
        except (ValueError, RuntimeError) as exc:  # unknown library, data not fetched
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
        overrides = {"methods": _split(methods), "tasks": _split(tasks), "limit": limit, "out_dir": out,
                     "composite_sizes": tuple(composite) if composite else None, "xlora_limit": xlora_limit,
                     "xlora_train_per_adapter": xlora_train, "xlora_epochs": xlora_epochs,
                     "composite_limit": composite_limit, "freeform_limit": freeform,
                     "max_new_tokens": max_new_tokens, "batch_size": batch_size, "base": base,
                     "adapter_dirs": dirs, "router_dir": routers, "suite": suite, "resume": resume or None}
        if quick:
            cfg = EvalConfig.quick_config(**overrides)
        else:
            cfg = EvalConfig(**{k: v for k, v in overrides.items() if v is not None})
        unknown = [m for m in cfg.methods if m not in reg]
        n_tasks = len(cfg.tasks or suite.task_names)
        sizes = [n for n in (composite or ()) if not 2 <= n <= n_tasks]
        problem = (f"unknown method(s) {unknown}; known: {', '.join(reg)}" if unknown
                   else f"--composite sizes must be from 2 to {n_tasks} (the tasks asked for), got {sizes}" if sizes
                   else _unwritable(out, doc, readme))
        if problem:
            console.print(f"[red]error:[/red] {problem}")
            raise typer.Exit(2)
        try:
            results = run_eval(cfg, on_method=_on_method)
        except ValueError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
        _print_table(results)
        console.print(f"wrote {out}/results.json, results.md and plots")
        _write_docs(results, out, doc, readme)
        print(Path(out) / "results.json")

    return eval_command


def _unwritable(out: Path, doc: Path | None, readme: Path | None) -> str | None:
    """Why the outputs cannot be written, checked before an eval of many minutes (None: they can)."""
    if out.exists() and not out.is_dir():
        return f"--out {out} exists and is not a folder"
    for flag, path in (("--doc", doc), ("--readme", readme)):
        if path is not None and not path.is_file():
            return f"{flag} {path} is not a file (it must exist and hold the generated markers)"
    return None


def _quiet() -> None:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(int(os.environ.get("LORASWITCH_THREADS", os.cpu_count() or 1)))


def _split(values):
    return [v.strip() for s in values for v in s.split(",") if v.strip()] if values else None


def _on_method(name: str, entry: dict) -> None:
    if entry["status"] != "ok":
        console.print(f"[yellow]{name}[/yellow]: {entry['status']} ({entry.get('error')})")
        return
    extra = ""
    if entry.get("routes"):
        extra = f", routing {_pct(entry['routing_accuracy']['overall'])}, abstain {_pct(entry.get('abstain_rate'))}"
    console.print(f"[green]{name}[/green]: accuracy {_pct(entry['accuracy']['overall'])}{extra} "
                  f"({entry['wall_s']:.1f} s answering, {entry.get('setup_s', 0):.1f} s setup)")


def _print_table(results: dict) -> None:
    table = Table("method", "accuracy", "held-out wording", "routing", "abstain", "composite parts", "time (s)",
                  title=f"loraswitch eval ({results['meta'].get('suite')})")
    for name, r in results["methods"].items():
        if r["status"] != "ok":
            table.add_row(name, f"[yellow]{r['status']}[/yellow]", "", "", "", "", "")
            continue
        parts = [c["part_accuracy"] for c in r.get("composite", {}).values() if c.get("part_accuracy") is not None]
        table.add_row(name, _pct(r["accuracy"]["overall"]), _pct(r.get("accuracy_heldout_wording")),
                      _pct(r.get("routing_accuracy", {}).get("overall")), _pct(r.get("abstain_rate")),
                      _pct(sum(parts) / len(parts)) if parts else "–", f"{r['wall_s']:.1f}")
    console.print(table)


def _write_docs(results: dict, out: Path, doc: Path | None, readme: Path | None) -> None:
    if doc is not None:
        from loraswitch.eval.report import update_doc

        update_doc(doc, "eval", (Path(out) / "results.md").read_text(), images_from=Path(out))
        console.print(f"updated {doc}")
    if readme is not None:
        from loraswitch.eval.report import readme_summary, update_doc

        update_doc(readme, "eval", readme_summary(results, str(doc or Path(out) / "results.md")))
        console.print(f"updated {readme}")


__all__ = ["make_eval_command"]
