"""The demo's commands: `loraswitch demo` (base model vs routed answers) and `loraswitch zoo
build|eval` (train and measure the embedded libraries' adapters). Registered by `loraswitch.cli`;
the core never imports them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from loraswitch.console import BaseOpt, DirsOpt, LibraryOpt, console, fail, library_paths, open_switch, quiet

zoo_app = typer.Typer(help="Train and measure the embedded libraries' adapters.", no_args_is_help=True)
data_app = typer.Typer(help="Fetch the data a task suite needs (never committed).", no_args_is_help=True)


# ---------------------------------------------------------------------------- data
@data_app.command("bigbench")
def data_bigbench(
    sdist: Annotated[Path | None, typer.Option(help="Use this already downloaded bigbench-1.0.0.tar.gz instead of pip download.")] = None,
) -> None:
    """Download bigbench==1.0.0 with pip (once), extract the ten tasks' files into the cache, verify
    them, and report each task's splits and prompt lengths."""
    from loraswitch.demo.bigbench.fetch import BigBenchDataError, ensure
    from loraswitch.demo.bigbench.tasks import TASK_NAMES, rendered, splits

    try:
        with console.status("fetching BIG-bench (pip download of a 360 MB sdist, once)..."):
            root = ensure(sdist)
    except BigBenchDataError as exc:
        raise fail(str(exc)) from None
    table = Table("task", "usable", "train", "val", "test", "dropped: duplicate", "dropped: over-long", title=f"BIG-bench tasks in {root}")
    for task in TASK_NAMES:
        exs, dupes, too_long = rendered(task, root)
        sp = splits(task, root)
        table.add_row(task, str(len(exs)), *(str(len(sp[s])) for s in ("train", "val", "test")), str(dupes), str(too_long))
    Console().print(table)


# ---------------------------------------------------------------------------- demo
def demo(
    base: BaseOpt = None,
    adapter_dir: DirsOpt = None,
    library: LibraryOpt = "demo",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 40,
) -> None:
    """The main job: base model vs automatically routed answers on prompts of every task."""
    from loraswitch.demo.tasks import TASK_NAMES, composites, examples, out_of_suite, parse_numbered, score
    from loraswitch.generate import SamplingParams

    if library != "demo":
        raise fail(f"the demo for library {library!r} is not built yet")
    switch = open_switch(base, adapter_dir, library=library)
    # per task, the first of a few test prompts the base model gets wrong (the adapters' job)
    candidates = {t: examples(t, "test", 4, seed=3) for t in TASK_NAMES}
    flat = [e for t in TASK_NAMES for e in candidates[t]]
    oos = out_of_suite("test", 1)[0]
    params = SamplingParams(max_new_tokens=max_new_tokens)
    with console.status("base model answering..."):
        answers = switch.chat([e.prompt for e in flat] + [oos], model="base", params=params)
    by_prompt = dict(zip([e.prompt for e in flat] + [oos], answers))
    picks = [next((e for e in candidates[t] if not score(t, by_prompt[e.prompt].text, e.answer)), candidates[t][0])
             for t in TASK_NAMES]
    prompts = [e.prompt for e in picks] + [oos]
    base_out = [by_prompt[p] for p in prompts]
    with console.status("routing and answering..."):
        auto_out = switch.chat(prompts, model="auto", params=params)
    table = Table("prompt", "expected", "base model", "loraswitch (auto)", "routed to", title="loraswitch demo", show_lines=True)
    wins = 0
    for i, prompt in enumerate(prompts):
        ex = picks[i] if i < len(picks) else None
        ok_b = ex is not None and score(ex.task, base_out[i].text, ex.answer)
        ok_a = ex is not None and score(ex.task, auto_out[i].text, ex.answer)
        wins += ok_a and not ok_b
        marks = [("[green]✓[/green] " if ok else "[red]✗[/red] ") if ex is not None else "" for ok in (ok_b, ok_a)]
        table.add_row(prompt, ex.answer if ex else "(open question)", marks[0] + base_out[i].text[:60],
                      marks[1] + auto_out[i].text[:60], str(auto_out[i].routing.get("adapter") or "base (abstained)"))
    Console().print(table)
    comp = composites(3, 1, seed=5)[0]
    res = switch.chat([comp.prompt], model="auto", params=SamplingParams(max_new_tokens=96))[0]
    parts = parse_numbered(res.text, len(comp.parts))
    Console().print(f"\n[bold]A prompt that mixes tasks[/bold]\n{comp.prompt}\n\n[bold]answer[/bold] (adapter per part: {res.routing.get('adapter')})\n{res.text}")
    Console().print("part scores: " + " ".join("✓" if score(p.task, got, p.answer) else "✗" for p, got in zip(comp.parts, parts)))
    Console().print(f"\n{wins} of {len(picks)} task prompts answered correctly by routing where the base model failed.")


# ---------------------------------------------------------------------------- zoo
@zoo_app.command("build")
def zoo_build(
    tasks: Annotated[list[str] | None, typer.Option("--task", help="Only these tasks (repeatable).")] = None,
    steps_scale: Annotated[float, typer.Option(help="Multiply every recipe's steps (e.g. 0.1 for a smoke run).")] = 1.0,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: the --library's adapters).")] = None,
    library: LibraryOpt = "demo",
    evaluate: Annotated[bool, typer.Option(help="Measure the new adapters afterwards (zoo eval).")] = True,
) -> None:
    """Train one LoRA per task of a library on the default base (CPU: about an hour for either library)."""
    quiet()
    from loraswitch.base import load_base
    from loraswitch.demo.zoo.build import train_zoo

    names = _library_tasks(library, tasks)
    target = out or library_paths(library, None, None)[0][0]
    train_zoo(load_base(), names, target, steps_scale, library=library)
    if evaluate:
        zoo_eval(tasks=names, adapter_dir=target, library=library)


def _library_tasks(library: str, tasks: list[str] | None) -> list[str]:
    """`tasks` checked against the library's tasks (all of them when None); a clean error when the
    library is unknown, a task is not in it, or its data is missing."""
    from loraswitch.demo.zoo.recipes import zoo_tasks

    try:
        known = zoo_tasks(library)
        if library == "bigbench":
            from loraswitch.demo.bigbench.fetch import BigBenchDataError, require

            try:
                require()
            except BigBenchDataError as exc:
                raise fail(str(exc)) from None
    except ValueError as exc:
        raise fail(str(exc)) from None
    names = list(tasks or known)
    unknown = [t for t in names if t not in known]
    if unknown:
        raise fail(f"unknown task(s) {unknown}; tasks of {library}: {', '.join(known)}")
    return names


@zoo_app.command("eval")
def zoo_eval(
    tasks: Annotated[list[str] | None, typer.Option("--task")] = None,
    adapter_dir: Annotated[Path | None, typer.Option()] = None,
    n: Annotated[int, typer.Option(help="Test prompts per task.")] = 200,
    doc: Annotated[Path | None, typer.Option("--doc", help="Also write the results table into this markdown file, e.g. README.md.")] = None,
) -> None:
    """Each demo adapter and the base model on the adapter's held-out test split; updates the manifest."""
    from loraswitch.demo.tasks import TASK_NAMES
    from loraswitch.demo.zoo.build import DEMO_ADAPTER_DIR, read_manifest, write_manifest
    from loraswitch.demo.zoo.evaluate import evaluate_zoo, markdown_table

    folder = adapter_dir or DEMO_ADAPTER_DIR
    switch = open_switch(None, [folder])
    names = [t for t in (tasks or TASK_NAMES) if t in switch.engine.adapters]
    results = evaluate_zoo(switch, names, n)
    manifest = read_manifest(folder)
    for task, res in results.items():
        manifest["adapters"].setdefault(task, {})["eval"] = res
    write_manifest(manifest, folder)
    if doc is not None:
        from loraswitch.eval.report import update_doc

        update_doc(doc, "zoo", markdown_table(manifest))
        console.print(f"updated {doc}")
    table = Table("adapter", "n", "adapter acc", "base acc", "held-out wording", "meets bar")
    for task, r in results.items():
        table.add_row(task, str(r["n_test"]), f"{r['adapter_accuracy']:.1%}", f"{r['base_accuracy']:.1%}",
                      f"{r['adapter_accuracy_heldout_wording']:.1%}", "[green]yes[/green]" if r["meets_bar"] else "[red]NO[/red]")
    Console().print(table)
    if not all(r["meets_bar"] for r in results.values()):
        sys.exit(1)
