"""`loraswitch` command line. Thin on purpose: parse options, call the library, print.

Machine-readable outputs (`--json`) print exactly one JSON object on the last line of stdout.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from loraswitch.eval.cli import bench_command, eval_command
from loraswitch.merging.cli import merge_command
from loraswitch.server.cli import serve

app = typer.Typer(help="One LLM, many LoRA skills, no task label needed.", no_args_is_help=True, add_completion=False)
adapters_app = typer.Typer(help="The adapter library.", no_args_is_help=True)
zoo_app = typer.Typer(help="Train and measure the demo adapters.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")
app.add_typer(zoo_app, name="zoo")
app.command("merge")(merge_command)
app.command("serve")(serve)
app.command("eval")(eval_command)
app.command("bench")(bench_command)
console = Console(stderr=True)

BaseOpt = Annotated[str | None, typer.Option("--base", help="Model directory or .gguf file (default: embedded SmolLM2-135M-Instruct).")]
DirsOpt = Annotated[list[Path] | None, typer.Option("--adapter-dir", help="Folder of PEFT LoRA adapters (repeatable; default: the demo adapters).")]
RouterDirOpt = Annotated[Path | None, typer.Option("--router-dir", help="Folder of trained routers (default: the demo routers).")]


def _quiet() -> None:
    """Keep stdout clean for --json: transformers' progress bars and warnings go nowhere."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(int(os.environ.get("LORASWITCH_THREADS", os.cpu_count() or 1)))


def _switch(base: str | None, dirs: list[Path] | None, router_dir: Path | None = None):
    _quiet()
    from loraswitch.base import BaseModelError
    from loraswitch.switch import Switch

    try:
        switch = Switch(base, dirs, router_dir)
    except BaseModelError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    for name, err in switch.engine.errors.items():
        console.print(f"[yellow]refused adapter[/yellow] {name}: {err.reason}")
    return switch


def _fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


# ---------------------------------------------------------------------------- adapters
@adapters_app.command("list")
def adapters_list(base: BaseOpt = None, adapter_dir: DirsOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Names, rank, targets, size and status of every adapter found."""
    switch = _switch(base, adapter_dir)
    rows = [{"name": a.name, "status": "ok", "ranks": a.ranks, "targets": a.target_modules, "size_bytes": a.size_bytes,
             "warnings": a.warnings} for a in switch.engine.adapters.values()]
    rows += [{"name": name, "status": "refused", "reason": err.reason} for name, err in switch.engine.errors.items()]
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("name", "status", "rank", "targets", "size")
    for r in rows:
        if r["status"] == "ok":
            table.add_row(r["name"], "[green]ok[/green]", ",".join(map(str, r["ranks"])), ",".join(r["targets"]), f"{r['size_bytes'] / 1e6:.1f} MB")
        else:
            table.add_row(r["name"], "[red]refused[/red]", "", r["reason"], "")
    Console().print(table)


# ---------------------------------------------------------------------------- generate / route
@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The user's message.")],
    base: BaseOpt = None,
    adapter_dir: DirsOpt = None,
    router_dir: RouterDirOpt = None,
    adapter: Annotated[str | None, typer.Option(help="Use this adapter ('base' for none) instead of routing.")] = None,
    route: Annotated[str, typer.Option(help="Router when no --adapter: auto | seq | arrow | gate.")] = "auto",
    max_new_tokens: Annotated[int, typer.Option(min=1, max=4096)] = 64,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    seed: int | None = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print {text, token_ids, adapter, routing} as JSON.")] = False,
    trace: Annotated[bool, typer.Option(help="Include the per-token routing trace.")] = False,
) -> None:
    """Chat-templated generation, routed automatically unless --adapter is given."""
    from loraswitch.generate import SamplingParams
    from loraswitch.library import AdapterError
    from loraswitch.routing.base import StaleRouterError

    switch = _switch(base, adapter_dir, router_dir)
    model = adapter if adapter is not None else "auto"
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    try:
        res = switch.chat([prompt], model=model, route=None if adapter is not None else route, params=params)[0]
    except (AdapterError, StaleRouterError, FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from None
    chosen = adapter if adapter is not None else res.routing.get("adapter")
    out = {"text": res.text, "token_ids": res.token_ids, "adapter": None if chosen == "base" else chosen, "finish_reason": res.finish_reason}
    if adapter is None:
        out["routing"] = {**res.routing, "events": res.events, **({"trace": res.trace} if trace else {})}
    if as_json:
        print(json.dumps(out))
    else:
        if adapter is None:
            console.print(f"[dim]routed to {chosen or 'base model'} ({res.routing.get('router')})[/dim]")
        print(res.text)
        if trace:
            for step in res.trace:
                console.print(f"[dim]{step.get('token')!r:>14} {step['adapters']}[/dim]")


@app.command()
def route(
    prompt: Annotated[str, typer.Argument()],
    router: Annotated[str, typer.Option(help="auto | seq | arrow | gate")] = "auto",
    base: BaseOpt = None,
    adapter_dir: DirsOpt = None,
    router_dir: RouterDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Which adapter would answer PROMPT: {adapter (null = base model), confidence, scores}."""
    from loraswitch.routing.base import StaleRouterError

    switch = _switch(base, adapter_dir, router_dir)
    try:
        decision = switch.router(router).route(switch.engine, [prompt])[0]
    except (StaleRouterError, FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from None
    if as_json:
        print(json.dumps(decision.to_dict()))
        return
    console.print(f"{decision.adapter or 'base model'} (confidence {decision.confidence:.2f}) {decision.reason}")
    for name, score in sorted(decision.scores.items(), key=lambda kv: -kv[1]):
        console.print(f"  {name:<16} {score:.3f}")


@app.command("train-router")
def train_router(
    router: Annotated[str, typer.Option(help="seq | gate")] = "seq",
    data: Annotated[Path | None, typer.Option(help="Folder of <adapter>.jsonl/.txt example files (default: the demo task suite).")] = None,
    out: Annotated[Path | None, typer.Option(help="Where to write the router (default: the demo routers folder).")] = None,
    base: BaseOpt = None,
    adapter_dir: DirsOpt = None,
    per_adapter: Annotated[int, typer.Option(help="Training prompts per adapter from the demo suite.")] = 200,
) -> None:
    """Train the sequence selector or the token-level gates for an adapter library."""
    from loraswitch.constants import DEMO_ROUTER_DIR
    from loraswitch.routing.data import prompts_only, read_folder
    from loraswitch.routing.gate import train_gates
    from loraswitch.routing.seq import train_selector

    switch = _switch(base, adapter_dir)
    if data is None:  # the demo library's routers, trained on its own task suite
        from loraswitch.demo.router_data import demo_pairs

        train, val = demo_pairs("train", per_adapter), demo_pairs("val", max(20, per_adapter // 4))
    else:
        try:
            train, val = read_folder(data)
        except (OSError, ValueError) as exc:
            raise _fail(str(exc)) from None
    out = out or DEMO_ROUTER_DIR
    if router == "seq":
        trained = train_selector(switch.engine, prompts_only(train), prompts_only(val))
        console.print(f"temperature {trained.temperature:.3f}, abstain threshold {trained.threshold:.3f}")
    elif router == "gate":
        subset = {k: v[: max(8, per_adapter // 5)] for k, v in train.items()}
        trained = train_gates(switch.engine, subset)
    else:
        raise _fail(f"--router must be seq or gate (arrow needs no training), got {router!r}")
    console.print(f"wrote {trained.save(out)}")


# ---------------------------------------------------------------------------- demo
@app.command()
def demo(
    base: BaseOpt = None,
    adapter_dir: DirsOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 40,
) -> None:
    """The main job: base model vs automatically routed answers on prompts of every task."""
    from loraswitch.demo.tasks import TASK_NAMES, composites, examples, out_of_suite, parse_numbered, score
    from loraswitch.generate import SamplingParams

    switch = _switch(base, adapter_dir)
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
    out: Annotated[Path | None, typer.Option(help="Output folder (default: the package's demo_adapters).")] = None,
    evaluate: Annotated[bool, typer.Option(help="Measure the new adapters afterwards (zoo eval).")] = True,
) -> None:
    """Train one LoRA per demo task on the default base (slow on CPU: about an hour for all eight)."""
    _quiet()
    from loraswitch.base import load_base
    from loraswitch.demo.tasks import TASK_NAMES
    from loraswitch.demo.zoo.build import DEMO_ADAPTER_DIR, train_zoo

    names = tasks or list(TASK_NAMES)
    unknown = [t for t in names if t not in TASK_NAMES]
    if unknown:
        raise _fail(f"unknown task(s) {unknown}; tasks: {', '.join(TASK_NAMES)}")
    target = out or DEMO_ADAPTER_DIR
    train_zoo(load_base(), names, target, steps_scale)
    if evaluate:
        zoo_eval(tasks=names, adapter_dir=target)


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
    switch = _switch(None, [folder])
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


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
