"""`loraswitch bench` / `benchmarks/bench.py`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from loraswitch.bench.config import CONFIGS, LLAMA_SHAPES, BenchConfig, console


def bench_command(
    models: Annotated[list[str] | None, typer.Option("--models", help="smollm2 and/or " + ", ".join(LLAMA_SHAPES) + " (repeatable or comma-separated).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    batch_sizes: Annotated[list[int] | None, typer.Option("--batch", help="Batch sizes (default 1 and 16).")] = None,
    new_tokens: Annotated[int | None, typer.Option(min=2)] = None,
    prompt_len: Annotated[int | None, typer.Option(min=1)] = None,
    repeats: Annotated[int | None, typer.Option(min=1, help="Timed runs per configuration (best is kept).")] = None,
    scaling: Annotated[list[int] | None, typer.Option("--scaling", help="Adapters loaded for the scaling study (default 1 8 32 128).")] = None,
    max_resident: Annotated[int | None, typer.Option("--max-resident", min=8, help="Scaling study: keep at most this many adapters in the layers' stacks (the rest paged out, in host memory).")] = None,
    configs: Annotated[list[str] | None, typer.Option("--configs", help="Only these configurations: " + ", ".join(CONFIGS))] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="float32 (default), bfloat16 or float16: weights and adapters.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="SmolLM2 only, batch 16, 16 new tokens, 8 vs 128 adapters.")] = False,
    profile: Annotated[bool, typer.Option("--profile", help="Also profile the loraswitch decode paths (torch profiler).")] = False,
    out: Annotated[Path, typer.Option("--out")] = Path("benchmarks/results"),
    doc: Annotated[Path | None, typer.Option("--doc", help="Also write the result tables into this markdown file (between generated markers), e.g. docs/benchmarks.md.")] = None,
    readme: Annotated[Path | None, typer.Option("--readme", help="Also write the short summary into this markdown file, e.g. README.md.")] = None,
    rejudge: Annotated[Path | None, typer.Option("--rejudge", help="Time nothing: judge a saved bench_<device>.json again with the current targets (goals, spreads) and write it, its markdown and --doc / --readme.")] = None,
) -> None:
    """Speed and memory: loraswitch vs one merged adapter, the base model and PEFT."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from loraswitch.bench.run import run_bench

    torch.set_num_threads(int(os.environ.get("LORASWITCH_THREADS", os.cpu_count() or 1)))

    def split(values):
        return [v.strip() for s in values for v in str(s).split(",") if v.strip()] if values else None

    overrides = {"models": split(models), "device": device, "batch_sizes": batch_sizes, "new_tokens": new_tokens,
                 "prompt_len": prompt_len, "repeats": repeats, "scaling": scaling, "configs": split(configs),
                 "out_dir": out, "profile": profile, "dtype": dtype, "max_resident": max_resident}
    cfg = BenchConfig.quick_config(**overrides) if quick else BenchConfig(**{k: v for k, v in overrides.items() if v is not None})
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        console.print(f"[red]error:[/red] --dtype must be float32, bfloat16 or float16, not {cfg.dtype!r}")
        raise typer.Exit(2)
    bad = [c for c in cfg.configs if c not in CONFIGS]
    if bad:
        console.print(f"[red]error:[/red] unknown configuration(s) {bad}; known: {', '.join(CONFIGS)}")
        raise typer.Exit(2)
    try:
        if rejudge is not None:
            import json

            from loraswitch.bench.run import rejudge as judge_again
            from loraswitch.bench.run import write_results

            res = judge_again(json.loads(rejudge.read_text()))
            write_results(res, Path(out))
        else:
            with console.status("benchmarking...") as status:
                res = run_bench(cfg, lambda s: status.update(f"benchmarking {s}"))
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    _show(res)
    _write_docs(res, Path(out), doc, readme)


def _show(res: dict) -> None:
    """Each model's targets as a table on the console, and any configuration that failed."""
    for m in res["models"]:
        if "error" in m:
            console.print(f"[red]{m['model']} failed:[/red] {m['error']}")
            continue
        table = Table("target", "measured", "status", title=f"{m['model']} ({m['wall_s']} s)")
        for t in m["targets"]:
            table.add_row(t["target"], f"{t['ratio']}x", "[green]met[/green]" if t["met"] else
                          ("[yellow]too noisy to judge[/yellow]" if t["met"] is None else "[red]NOT MET[/red]"))
        console.print(table)
        for b, rows in m.get("batches", {}).items():
            for config, r in rows.items():
                if "error" in r:
                    console.print(f"[red]{m['model']} batch {b} {config} failed:[/red] {r['error']}")


def _write_docs(res: dict, out: Path, doc: Path | None, readme: Path | None) -> None:
    """The run's tables into `doc`'s and its summary into `readme`'s generated blocks."""
    from loraswitch.eval.report import update_doc

    stem = f"bench_{res['device'].split(':')[0]}"
    console.print(f"wrote {out}/{stem}.json, {stem}.md, {stem}_scaling.png")
    if doc is not None:
        body = (out / f"{stem}.md").read_text() + f"\n![decode tokens/s vs adapters loaded]({stem}_scaling.png)\n"
        update_doc(doc, f"bench-{stem}", body, images_from=out)
        console.print(f"updated {doc}")
    if readme is not None:
        from loraswitch.bench.report import readme_summary

        update_doc(readme, f"bench-{stem}", readme_summary(res, str(doc or out / f"{stem}.md")))
        console.print(f"updated {readme}")
    print(out / f"{stem}.json")
