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
    router_data: Annotated[Path | None, typer.Option(help="Also write <task>.jsonl router training files (train split) here, for `train-router --data`.")] = None,
    per_task: Annotated[int, typer.Option(min=1, help="Prompts per task in --router-data.")] = 200,
) -> None:
    """Download bigbench==1.0.0 with pip (once), extract the ten tasks' files into the cache, verify
    them, and report each task's splits and what was dropped (duplicates, over-long prompts)."""
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
    if router_data is not None:
        from loraswitch.demo.router_data import write_bigbench_router_data

        paths = write_bigbench_router_data(router_data, per_task)
        console.print(f"wrote {len(paths)} router example files to {router_data}")


# ---------------------------------------------------------------------------- demo
def demo(
    base: BaseOpt = None,
    adapter_dir: DirsOpt = None,
    library: LibraryOpt = "demo",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 40,
) -> None:
    """The main job: base model vs automatically routed answers on prompts of every task."""
    from loraswitch.demo.suites import suite_for
    from loraswitch.generate import SamplingParams

    try:
        suite = suite_for(library)
    except (ValueError, RuntimeError) as exc:
        raise fail(str(exc)) from None
    switch = open_switch(base, adapter_dir, library=library)
    tasks = [t for t in suite.task_names if t in switch.engine.adapters]
    # per task, the first of a few test prompts the base model gets wrong (the adapters' job)
    candidates = {t: suite.examples(t, "test", 4, seed=3) for t in tasks}
    flat = [c for t in tasks for c in candidates[t]]
    oos = suite.out_of_suite("test", 1)[0]
    params = SamplingParams(max_new_tokens=max_new_tokens)
    with console.status("base model answering..."):
        answers = switch.chat([c.prompt for c in flat] + [oos], model="base", params=params)
    by_prompt = dict(zip([c.prompt for c in flat] + [oos], answers))
    picks = [next((c for c in candidates[t] if not suite.score(c, by_prompt[c.prompt].text)), candidates[t][0])
             for t in tasks]
    prompts = [c.prompt for c in picks] + [oos]
    with console.status("routing and answering..."):
        auto_out = switch.chat(prompts, model="auto", params=params)
    wins = _demo_table(suite, picks, [by_prompt[p] for p in prompts], auto_out, prompts)
    _demo_composite(switch, suite, tasks)
    _demo_open_request(switch, picks[0].prompt if picks else None)
    _demo_chain(switch)
    Console().print(f"\n{wins} of {len(picks)} task prompts answered correctly by routing where the base model failed.")


def _short(text: str, n: int) -> str:
    """`text` cut to `n` characters, escaped for rich (prompts hold brackets: MeteoRA's [INST])."""
    from rich.markup import escape

    return escape(text if len(text) <= n else text[: n - 1] + "…")


def _demo_table(suite, picks, base_out, auto_out, prompts) -> int:
    """Print prompt / expected / base / routed rows; returns how many the routing alone got right."""
    table = Table("prompt", "expected", "base model", "loraswitch (auto)", "routed to", title=f"loraswitch demo ({suite.name})",
                  show_lines=True)
    wins = 0
    for i, prompt in enumerate(prompts):
        case = picks[i] if i < len(picks) else None
        ok_b = case is not None and suite.score(case, base_out[i].text)
        ok_a = case is not None and suite.score(case, auto_out[i].text)
        wins += ok_a and not ok_b
        marks = [("[green]✓[/green] " if ok else "[red]✗[/red] ") if case is not None else "" for ok in (ok_b, ok_a)]
        table.add_row(_short(prompt, 300), _short(case.answer, 80) if case else "(open question)", marks[0] + _short(base_out[i].text, 60),
                      marks[1] + _short(auto_out[i].text, 60), str(auto_out[i].routing.get("adapter") or "base (abstained)"))
    Console().print(table)
    return wins


def _demo_composite(switch, suite, tasks: list[str]) -> None:
    """One prompt that mixes tasks (the suite's smallest composite), answered routed, scored per part."""
    from loraswitch.generate import SamplingParams

    comps = suite.composites(tasks, suite.composite_sizes[0], 1, seed=5)
    if not comps:
        return
    comp = comps[0]
    res = switch.chat([comp.prompt], model="auto", params=SamplingParams(max_new_tokens=32 * len(comp.parts) + 8))[0]
    parts = suite.parse_parts(res.text, len(comp.parts))
    Console().print(f"\n[bold]A prompt that mixes tasks[/bold]\n{_short(comp.prompt, 3000)}\n\n[bold]answer[/bold] "
                    f"(adapter per part: {_short(str(res.routing.get('adapter')), 400)})\n{_short(res.text, 2000)}")
    Console().print("part scores: " + " ".join("✓" if suite.score(p, got) else "✗" for p, got in zip(comp.parts, parts)))


def _demo_open_request(switch, task_prompt: str | None) -> None:
    """A task's prompt with a request no adapter fits asked after it: two parts, the second the
    base model's (docs/routing.md, "A request no adapter fits")."""
    from loraswitch.generate import SamplingParams

    if not task_prompt or "\n" in task_prompt.strip():
        return
    prompt = task_prompt.strip().rstrip(".") + ". Also, tell me a fun fact about owls."
    res = switch.chat([prompt], model="auto", params=SamplingParams(max_new_tokens=72))[0]
    who = [p.get("adapter") or "base" for p in res.routing.get("parts", [])] or [res.routing.get("adapter") or "base"]
    Console().print(f"\n[bold]A task and a request no adapter fits[/bold]\n{_short(prompt, 600)}\n\n[bold]answer[/bold] "
                    f"(per part: {', '.join(who)})\n{_short(res.text, 1000)}")


CHAIN_PROMPT = "What is 25 + 17? Then spell the result in English."


def _demo_chain(switch) -> None:
    """A request on the answer of the one before it: the second part is answered after the first,
    with its answer written in (docs/routing.md, "A part that works on the answer before it").
    Shown where the library has the two adapters it needs (the demo library)."""
    from loraswitch.generate import SamplingParams

    if not {"add", "num_to_english"} <= set(switch.engine.adapters):
        return
    res = switch.chat([CHAIN_PROMPT], model="auto", params=SamplingParams(max_new_tokens=32))[0]
    parts = res.routing.get("parts", [])
    read = next((p["read"] for p in parts if p.get("read")), None)
    Console().print(f"\n[bold]A request on the answer before it[/bold]\n{CHAIN_PROMPT}\n\n[bold]answer[/bold] "
                    f"(per part: {', '.join(p.get('adapter') or 'base' for p in parts)}"
                    f"{'; part 2 read ' + repr(read) if read else ''})\n{_short(res.text, 1000)}")


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
    library: LibraryOpt = "demo",
    n: Annotated[int, typer.Option(help="Test prompts per task.")] = 200,
    doc: Annotated[Path | None, typer.Option("--doc", help="Also write the results table into this markdown file, e.g. README.md.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Skip adapters the manifest already has measured on --n prompts.")] = False,
) -> None:
    """Each adapter of a library and the base model on the adapter's held-out test split; updates the manifest after each."""
    from loraswitch.demo.suites import suite_for
    from loraswitch.demo.zoo.build import read_manifest, write_manifest
    from loraswitch.demo.zoo.evaluate import evaluate_zoo, markdown_table

    names = _library_tasks(library, tasks)
    folder = adapter_dir or library_paths(library, None, None)[0][0]
    switch = open_switch(None, [folder])
    names = [t for t in names if t in switch.engine.adapters]
    manifest = read_manifest(folder)
    if resume:  # an eval in the manifest is of the current weights: `zoo build` drops it on retraining
        names = [t for t in names if manifest["adapters"].get(t, {}).get("eval", {}).get("n_test") != n]

    def record(task: str, res: dict) -> None:
        current = read_manifest(folder)
        current["adapters"].setdefault(task, {})["eval"] = res
        write_manifest(current, folder)

    evaluate_zoo(switch, suite_for(library), names, n, on_task=record)
    manifest = read_manifest(folder)
    results = {t: e["eval"] for t, e in manifest["adapters"].items() if "eval" in e and t in (tasks or manifest["adapters"])}
    if doc is not None:
        from loraswitch.eval.report import update_doc

        update_doc(doc, "zoo" if library == "demo" else f"zoo-{library}", markdown_table(manifest, library))
        console.print(f"updated {doc}")
    table = Table("adapter", "n", "adapter acc", "base acc", "meets bar")
    for task, r in results.items():
        table.add_row(task, str(r["n_test"]), f"{r['adapter_accuracy']:.1%}", f"{r['base_accuracy']:.1%}",
                      "[green]yes[/green]" if r["meets_bar"] else "[red]NO[/red]")
    Console().print(table)
    if not all(r["meets_bar"] for r in results.values()):
        sys.exit(1)
