"""`loraswitch` command line. Thin on purpose: parse options, call the library, print.

Machine-readable outputs (`--json`) print exactly one JSON object on the last line of stdout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from loraswitch.bench.cli import bench_command
from loraswitch.console import BaseOpt, DirsOpt, LibraryOpt, RouterDirOpt, console, fail, open_switch
from loraswitch.demo.commands import data_app, demo, zoo_app
from loraswitch.demo.suites import suite_for
from loraswitch.eval.cli import make_eval_command
from loraswitch.merging.cli import merge_command
from loraswitch.server.cli import serve
from loraswitch.server.shifts_cli import shifts_app

app = typer.Typer(help="One LLM, many LoRA skills, no task label needed.", no_args_is_help=True, add_completion=False)
adapters_app = typer.Typer(help="The adapter library.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")
app.add_typer(zoo_app, name="zoo")
app.command("demo")(demo)
app.command("merge")(merge_command)
app.command("serve")(serve)
app.command("eval")(make_eval_command(suite_for))
app.add_typer(data_app, name="data")
app.command("bench")(bench_command)
app.add_typer(shifts_app, name="shifts")


# ---------------------------------------------------------------------------- adapters
@adapters_app.command("list")
def adapters_list(base: BaseOpt = None, adapter_dir: DirsOpt = None, router_dir: RouterDirOpt = None,
                  library: LibraryOpt = "demo", as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Names, rank, targets, size, status and how `auto` routes each adapter (and since when)."""
    switch = open_switch(base, adapter_dir, router_dir, library)
    _print_adapters(switch, as_json)


@adapters_app.command("add")
def adapters_add(
    path: Annotated[Path, typer.Argument(help="A PEFT LoRA adapter folder to add to the library.")],
    name: Annotated[str | None, typer.Option(help="Its name (default: the folder's name).")] = None,
    examples: Annotated[Path | None, typer.Option(help="Example prompts it is for (.jsonl with 'prompt' / .txt, one per line); without them it is routed zero-shot unless its folder has examples.*.")] = None,
    base: BaseOpt = None, adapter_dir: DirsOpt = None, router_dir: RouterDirOpt = None, library: LibraryOpt = "demo",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Teach `auto` to route to a new adapter without retraining: its head is fitted (from the
    examples, else zero-shot) and kept with the library's routers, so later runs that load the
    adapter (`--adapter-dir`) route the same way."""
    from loraswitch.library import AdapterError, read_examples

    switch = open_switch(base, adapter_dir, router_dir, library)
    try:
        prompts = [p for p, _ in read_examples(examples)] if examples else None
        switch.engine.load_adapter(path, name=name, examples=prompts)
        switch.router("auto")
    except (AdapterError, OSError, ValueError) as exc:
        raise fail(str(exc)) from None
    _print_adapters(switch, as_json)


def _print_adapters(switch, as_json: bool) -> None:
    routed = _routing_of(switch)
    rows = [{"name": a.name, "status": "ok", "ranks": a.ranks, "targets": a.target_modules, "size_bytes": a.size_bytes,
             "warnings": a.warnings, "routing": routed.get(a.name)} for a in switch.engine.adapters.values()]
    rows += [{"name": name, "status": "refused", "reason": err.reason} for name, err in switch.engine.errors.items()]
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("name", "status", "rank", "targets", "size", "routed by")
    for r in rows:
        if r["status"] == "ok":
            routing = r["routing"] or {}
            how = routing.get("routed", "") + (" [memory only]" if routing.get("kept", "").startswith("kept in memory") else "")
            table.add_row(r["name"], "[green]ok[/green]", ",".join(map(str, r["ranks"])), ",".join(r["targets"]),
                          f"{r['size_bytes'] / 1e6:.1f} MB", how)
        else:
            table.add_row(r["name"], "[red]refused[/red]", "", r["reason"], "", "")
    Console().print(table)
    notes = {(r.get("routing") or {}).get("note") for r in rows} - {None, ""}
    for note in notes:  # auto fell back to Arrow: why (a stale router showed only "arrow" on every row)
        console.print(f"[yellow]{note}[/yellow]")


def _routing_of(switch) -> dict[str, dict]:
    """How `auto` routes each adapter; empty when no router can be built (say why on stderr)."""
    try:
        return switch.router("auto").describe(switch.engine)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[yellow]no routing information:[/yellow] {exc}")
        return {}


# ---------------------------------------------------------------------------- generate / route
@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The user's message.")],
    base: BaseOpt = None,
    adapter_dir: DirsOpt = None,
    router_dir: RouterDirOpt = None,
    library: LibraryOpt = "demo",
    adapter: Annotated[str | None, typer.Option(help="Use this adapter ('base' for none) instead of routing.")] = None,
    route: Annotated[str, typer.Option(help="Router when no --adapter: auto | seq | arrow | gate.")] = "auto",
    max_new_tokens: Annotated[int, typer.Option(min=1, max=4096)] = 64,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    top_p: Annotated[float, typer.Option(help="In (0, 1]: sample among the likeliest tokens holding this much probability.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k likeliest tokens (0 or -1: off).")] = 0,
    repetition_penalty: Annotated[float, typer.Option(help="In (0, 10]: > 1 discourages repeating prompt and answer tokens (1: off; greedy too).")] = 1.0,
    seed: int | None = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print {text, token_ids, adapter, routing} as JSON.")] = False,
    trace: Annotated[bool, typer.Option(help="Include the per-token routing trace.")] = False,
    compile_step: Annotated[bool, typer.Option("--compile", help="Decode with the compiled step (torch.compile; the first call compiles, about a minute or more).")] = False,
) -> None:
    """Chat-templated generation, routed automatically unless --adapter is given."""
    from loraswitch.generate import SamplingParams
    from loraswitch.library import AdapterError
    from loraswitch.routing.base import StaleRouterError
    from loraswitch.switch.request import Request

    if not prompt.strip():
        raise fail("the prompt is empty")
    try:  # the sampling settings are checked before the model loads
        top_k = Request.chat(prompt, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                             repetition_penalty=repetition_penalty).top_k
    except ValueError as exc:
        raise fail(str(exc)) from None
    switch = open_switch(base, adapter_dir, router_dir, library)
    switch.engine.compile = compile_step
    model = adapter if adapter is not None else "auto"
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            repetition_penalty=repetition_penalty, seed=seed)
    try:
        res = switch.chat([prompt], model=model, route=None if adapter is not None else route, params=params)[0]
    except (AdapterError, StaleRouterError, FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from None
    if switch.engine.decoder is not None:  # what --compile cost, and whether it fell back
        dec = switch.engine.decoder
        console.print(f"[dim]compiled decode step: {', '.join(f'{k} in {v} s' for k, v in dec.compile_s.items()) or 'not used'}"
                      + (f" (fell back to eager: {dec.failed[:120]})" if dec.failed else "") + "[/dim]")
    chosen = adapter if adapter is not None else res.routing.get("adapter")
    out = {"text": res.text, "token_ids": res.token_ids, "adapter": None if chosen == "base" else chosen, "finish_reason": res.finish_reason}
    out["routing"] = {**res.routing, "events": res.events, **({"trace": res.trace} if trace else {})}
    if as_json:
        print(json.dumps(out))
    else:
        if adapter is None:
            console.print(f"[dim]routed to {chosen or 'base model'} ({res.routing.get('router')})[/dim]")
            note = getattr(switch.router(route or "auto"), "note", "") if model == "auto" else ""
            if note:  # auto fell back to Arrow: say why (a stale router said nothing outside --json)
                console.print(f"[yellow]{note}[/yellow]")
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
    library: LibraryOpt = "demo",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Which adapter would answer PROMPT: {adapter (null = base model), confidence, scores}; a
    prompt answered part by part: {adapter: [one per part], confidence, parts, whole}."""
    from loraswitch.routing.base import StaleRouterError

    if not prompt.strip():
        raise fail("the prompt is empty")
    switch = open_switch(base, adapter_dir, router_dir, library)
    try:
        decision = switch.route(prompt, router)
    except (StaleRouterError, FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from None
    if as_json:
        print(json.dumps(decision))
        return
    chosen = decision["adapter"]
    shown = " + ".join(a or "base model" for a in chosen) if isinstance(chosen, list) else chosen or "base model"
    console.print(f"{shown} (confidence {decision['confidence']:.2f}) {decision.get('reason', '')}")
    for name, score in sorted(decision.get("scores", {}).items(), key=lambda kv: -kv[1]):
        console.print(f"  {name:<16} {score:.3f}")
    for k, part in enumerate(decision.get("parts", []), 1):
        console.print(f"part {k}: {part['adapter'] or 'base model'} ({part['confidence']:.2f})  {part['text'][:60]!r}")


@app.command("train-router")
def train_router(
    router: Annotated[str, typer.Option(help="seq | gate")] = "seq",
    data: Annotated[Path | None, typer.Option(help="Folder of <adapter>.jsonl/.txt example files (default with --library demo: the demo task suite).")] = None,
    out: Annotated[Path | None, typer.Option(help="Where to write the router (default: the --library's routers folder).")] = None,
    base: BaseOpt = None,
    adapter_dir: DirsOpt = None,
    library: LibraryOpt = "demo",
    per_adapter: Annotated[int, typer.Option(help="Training prompts per adapter from the demo suite.")] = 200,
    bundled_none: Annotated[bool, typer.Option("--bundled-none/--no-bundled-none", help="Train on the bundled __none__ prompts (open requests and near misses) besides your __none__ file; leave them out when one of your adapters does what a bundled near miss asks.")] = True,
    max_threshold: Annotated[float | None, typer.Option(min=0.2, max=0.99, help="seq only: the abstain threshold's ceiling (default 0.7); higher abstains on more near misses and more new wordings of your tasks alike (docs/routing.md, 'Near misses').")] = None,
) -> None:
    """Train the sequence selector or the token-level gates for an adapter library."""
    from loraswitch.console import library_paths
    from loraswitch.routing.data import checked_folder, prompts_only, read_folder
    from loraswitch.routing.gate import train_gates
    from loraswitch.routing.seq import train_selector

    if max_threshold is not None and router != "seq":
        raise typer.BadParameter("--max-threshold applies to --router seq only", param_hint="--max-threshold")
    if out is None and adapter_dir:  # the default is the --library's own routers folder
        raise fail("--out FOLDER is required with --adapter-dir (the default, the --library's routers, belongs to "
                   "that library); then serve with --router-dir FOLDER")
    switch = open_switch(base, adapter_dir, library=library)
    if data is None:  # the demo library's routers, trained on its own task suite
        if library != "demo" or adapter_dir:
            raise fail("--data FOLDER is required (one <adapter>.jsonl / .txt file of example prompts per adapter)")
        from loraswitch.demo.router_data import demo_pairs

        train, val = demo_pairs("train", per_adapter), demo_pairs("val", max(20, per_adapter // 4))
    else:
        try:
            train, val = read_folder(data, bundled=bundled_none)
        except (OSError, ValueError) as exc:
            raise fail(str(exc)) from None
        try:
            train, val, counts, notes = checked_folder(switch.engine, switch.base.tokenizer, data, train, val)
        except ValueError as exc:
            raise fail(str(exc)) from None
        console.print(counts)
        for note in notes:
            console.print(f"[yellow]{note}[/yellow]")
    out = out or library_paths(library, None, None)[1]
    if router == "seq":
        ceiling = {} if max_threshold is None else {"ceiling": max_threshold}
        trained = train_selector(switch.engine, prompts_only(train), prompts_only(val), **ceiling)
        console.print(f"temperature {trained.temperature:.3f}, abstain threshold {trained.threshold:.3f}")
    elif router == "gate":
        subset = {k: v[: max(8, per_adapter // 5)] for k, v in train.items()}
        trained = train_gates(switch.engine, subset)
    else:
        raise fail(f"--router must be seq or gate (arrow needs no training), got {router!r}")
    console.print(f"wrote {trained.save(out)}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
