"""What `model="auto"` costs end to end, and where the served path's time goes (issue 17, items 3-4).

The same demo prompts (request i asks task i mod 8, so naming "the adapter" means its task's) are
answered as `auto`, with the adapter named, and by `base`, at 1, 8 and 32 concurrent requests:

* **library**: `Switch.run` with N requests at once (the server worker's call), in this process;
* **server**: `loraswitch serve` in a subprocess (`load_server.ServerProcess`), N streamed chat
  requests in flight at once (`load_server.one`), so time to first token is what a client sees;
* with both, `engine`: `generate` alone (in this process) over the same chat-templated prompts
  with the adapters named (greedy, the same stop tokens, so the same answers as `named`: the work
  without the library's or the server's layers); with the server also `engine_forced`: every row
  forced to max_tokens (no stop tokens), whose decode tokens/s is `benchmarks/bench.py`'s
  quantity. They run in the same rounds as the server's requests (the server idle meanwhile),
  so served / engine is a ratio within one round.

Configurations run round-robin (round k starts k places further on) after a warm-up each;
medians, spread ((max - min) / median) and ratios paired within a round are reported, with the
machine's load average. The library reports each batch's `phases` (switch/run.py) and the server
sums them in /metrics (`loraswitch_phase_seconds`): the breakdown of the served path between the
engine's decode and the served completion tokens/s. `--cprofile` adds a cProfile of one library
round of `auto` at the largest concurrency.

    python benchmarks/auto_cost.py --quick --doc docs/benchmarks.md   # ~5 minutes on 2 cores
    python benchmarks/auto_cost.py --concurrency 1,8,32 --repeats 5

`--base/--adapter-dir/--router-dir` serve another library (e.g. `benchmarks/random_library.py`'s
on a GPU, with `LORASWITCH_DEVICE=cuda`); `--compile` decodes on the compiled step in the
library and the server (`serve --compile`: its graphs compile before the port opens). `--grow N`
adds N random adapters after the selector was trained (library only): what `auto` costs once the
library has grown.

Writes benchmarks/results/auto_cost.json and .md (and, with --doc, the generated block
`auto-cost` there). Bounded: --time-limit per server request; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from pathlib import Path
from statistics import median

import httpx
from load_server import ServerProcess, _metric, build_requests, library_args, one, save_report

LIB_CONFIGS = ("auto", "named", "base", "engine")
SERVER_CONFIGS = ("auto", "named", "base", "engine", "engine_forced")
PHASES = ("segment", "template", "route", "prefill", "decode", "listener", "other")


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def requests_for(n: int, names: list[str], seed: int) -> list[dict]:
    """N chat requests over the demo tasks, cycling over the adapters (`load_server.build_requests`)."""
    return build_requests(n, names, seed)


def model_of(config: str, req: dict) -> str:
    return {"auto": "auto", "base": "base"}.get(config, req["task"])


def record(wall: float, per_request: list[dict], phases: dict | None = None) -> dict:
    """One timed run: wall seconds, completion tokens, medians of the per-request numbers."""
    tokens = sum(r["tokens"] for r in per_request)
    ttft = [r["ttft"] for r in per_request if r.get("ttft") is not None]
    rates = [r["tokens"] / r["latency"] for r in per_request if r["latency"] > 0]
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall if wall else 0.0,
            "ttft_s": median(ttft) if ttft else None, "req_tok_s": median(rates) if rates else None,
            "phases": phases or {}}


# ---------------------------------------------------------------------------------------- library
def library_run(switch, reqs: list[dict], config: str, max_tokens: int, ignore_eos: bool = False) -> dict:
    """N requests through `Switch.run` at once; TTFT = first text token, from the call."""
    from loraswitch.switch.request import Done, Failed, Handle, Request, Token

    t0 = time.perf_counter()
    recs = [{"tokens": 0, "ttft": None, "latency": 0.0} for _ in reqs]

    def emit(i: int, event) -> None:
        now = time.perf_counter() - t0
        if isinstance(event, Token) and event.text and recs[i]["ttft"] is None:
            recs[i]["ttft"] = now
        elif isinstance(event, Done | Failed):
            recs[i]["latency"] = now
            if isinstance(event, Done):
                recs[i]["tokens"] = len(event.answer.token_ids)

    handles = [Handle(Request.chat(r["prompt"], model=model_of(config, r), max_tokens=max_tokens, ignore_eos=ignore_eos),
                      emit=lambda e, i=i: emit(i, e)) for i, r in enumerate(reqs)]
    batches = switch.run(handles, max_rows=32)
    wall = time.perf_counter() - t0
    phases: dict[str, float] = {}
    for info in batches:
        for k, v in (info.get("phases") or {}).items():
            phases[k] = phases.get(k, 0.0) + v
    return record(wall, recs, phases)


def engine_run(switch, reqs: list[dict], max_tokens: int, forced: bool) -> dict:
    """`generate` alone with the adapters named. `forced`: no stop tokens, every row writes
    max_tokens; its `decode_tok_s` counts the steps after the first token only (bench.py's)."""
    from loraswitch.generate import Listener, SamplingParams, explicit, generate
    from loraswitch.switch.request import Request

    prompts = [list(Request.chat(r["prompt"]).tokenized(switch.base).prompt_ids) for r in reqs]
    recs = [{"tokens": 0, "ttft": None, "latency": 0.0} for _ in reqs]
    t0 = time.perf_counter()

    class Marks(Listener):
        def token(self, row, gen):
            if recs[row]["ttft"] is None:
                recs[row]["ttft"] = time.perf_counter() - t0

        def finished(self, row, gen):
            recs[row]["latency"], recs[row]["tokens"] = time.perf_counter() - t0, len(gen.token_ids)

    params = SamplingParams(max_new_tokens=max_tokens, stop_ids=set() if forced else None)
    generate(switch.engine, prompts, explicit(switch.engine, [r["task"] for r in reqs]), params, Marks())
    out = record(time.perf_counter() - t0, recs)
    first = min((r["ttft"] for r in recs if r["ttft"] is not None), default=0.0)
    steps = sum(max(0, r["tokens"] - 1) for r in recs)
    out["decode_tok_s"] = steps / (out["wall_s"] - first) if out["wall_s"] > first else None
    return out


def engine_fns(switch, reqs: list[dict], max_tokens: int, configs, ignore_eos: bool = False) -> dict:
    """`engine` writes the answers the named requests get (forced to max_tokens too under
    --ignore-eos), `engine_forced` always forces them."""
    return {c: (lambda c=c: engine_run(switch, reqs, max_tokens, ignore_eos or c == "engine_forced"))
            for c in configs if c.startswith("engine")}


def refresher(args, names: list[str], n: int, reqs: list[dict]):
    """With --fresh-prompts, what round_robin calls before the warm-up (-1) and each round k:
    the round's own prompts of the same tasks, written into `reqs` in place (every configuration
    of a round answers the same ones). A server's traffic shares the chat template, not the
    prompts' text, and the prefix cache serves only openings distinct prompts share."""
    if not args.fresh_prompts:
        return None

    def refresh(k: int) -> None:
        reqs[:] = requests_for(n, names, args.seed + 1 + k)
    return refresh


def library_phase(args, switch, names: list[str], n: int, warm: bool) -> dict:
    """Every library configuration at concurrency `n`, round-robin."""
    reqs = requests_for(n, names, args.seed)
    fns = {c: (lambda c=c: library_run(switch, reqs, c, args.max_tokens, args.ignore_eos))
           for c in LIB_CONFIGS if c != "engine"}
    return round_robin({**fns, **engine_fns(switch, reqs, args.max_tokens, LIB_CONFIGS, args.ignore_eos)}, args.repeats,
                       f"library c={n}", warm, refresher(args, names, n, reqs))


# ---------------------------------------------------------------------------------------- server
def scrape(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {p: _metric(text, f'loraswitch_phase_seconds_total{{phase="{p}"}}') or 0.0 for p in PHASES}
    out["busy"] = _metric(text, "loraswitch_worker_busy_seconds_total") or 0.0
    out["batches"] = _metric(text, "loraswitch_batch_size_count") or 0.0
    return out


async def _burst(url: str, reqs: list[dict], config: str, args) -> tuple[float, list[dict]]:
    limits = httpx.Limits(max_connections=len(reqs), max_keepalive_connections=len(reqs))
    async with httpx.AsyncClient(base_url=url, timeout=args.time_limit, limits=limits) as client:
        sent = [{**r, "model": model_of(config, r)} for r in reqs]
        t0 = time.perf_counter()
        recs = await asyncio.gather(*(one(client, r, args.max_tokens, True, args.ignore_eos) for r in sent))
        return time.perf_counter() - t0, list(recs)


def server_run(url: str, reqs: list[dict], config: str, args) -> dict:
    """N streamed requests in flight at once; the worker's phases from /metrics before and after."""
    before = scrape(url)
    wall, recs = asyncio.run(_burst(url, reqs, config, args))
    after = scrape(url)
    bad = [r for r in recs if r.get("status") != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed: {bad[0].get('error')}")
    per = [{"tokens": r.get("tokens") or 0, "ttft": r.get("ttft"), "latency": r["latency"]} for r in recs]
    phases = {k: after[k] - before[k] for k in after}
    phases["outside_worker"] = max(0.0, wall - phases["busy"])
    out = record(wall, per, phases)
    out["batches"] = phases.pop("batches")
    return out


def start_server(args, switch) -> ServerProcess:
    """The server, started before this process's own set-up: with --compile both compile at once."""
    flags = ["--max-batch", "32", "--max-queue", "256", "--timeout", str(args.time_limit), "--max-new-tokens",
             str(args.max_tokens), "--default-temperature", "0", "--log-level", "warning",
             "--prefix-cache", str(switch.engine.prefix_tokens), *library_args(args)]
    return ServerProcess(flags, args.threads, log=Path(args.server_log) if args.server_log else None)


def server_phases(args, switch, names: list[str], server: ServerProcess) -> dict:
    out = {}
    for k, n in enumerate(args.concurrency):
        reqs = requests_for(n, names, args.seed)
        fns = {c: (lambda c=c, reqs=reqs: server_run(server.url, reqs, c, args))
               for c in SERVER_CONFIGS if not c.startswith("engine")}
        out[str(n)] = round_robin({**fns, **engine_fns(switch, reqs, args.max_tokens, SERVER_CONFIGS, args.ignore_eos)},
                                  args.repeats, f"server c={n}", k == 0 or args.fresh_prompts,
                                  refresher(args, names, n, reqs))
    return out


# ---------------------------------------------------------------------------------------- timing
def round_robin(fns: dict, repeats: int, label: str, warm: bool = True, refresh=None) -> dict:
    """A warm-up each (`warm`: the first concurrency; later ones find routers and caches warm),
    then `repeats` rounds, each starting one configuration further on. With `refresh` (fresh
    prompts: `refresh(k)` before round k) the warm-up runs on two prompt sets of its own (-2, -1),
    so the prefix cache has seen two prompts per task before round 0, as a running server has."""
    names = list(fns)
    runs: dict[str, list[dict]] = {c: [] for c in names}
    for w in ((-2, -1) if refresh else (None,)) if warm else ():
        if w is not None:
            refresh(w)
        for c in names:
            fns[c]()
    for k in range(repeats):
        if refresh:
            refresh(k)
        for c in names[k % len(names):] + names[: k % len(names)]:
            runs[c].append(fns[c]())
        print(f"{label}: round {k + 1}/{repeats} done, load {load()}", flush=True)
    ratios = {f"{a}/named": paired(runs[a], runs["named"]) for a in ("auto", "base")}
    if "engine" in runs:
        ratios["named/engine"] = paired(runs["named"], runs["engine"])
    if "engine_forced" in runs:
        ratios["named/engine_forced decode"] = paired(runs["named"], runs["engine_forced"], "decode_tok_s")
    return {"load": load(), "configs": {c: summarize(rs) for c, rs in runs.items()}, "ratios": ratios}


def _spread(xs: list[float]) -> float | None:
    m = median(xs)
    return round((max(xs) - min(xs)) / m, 3) if m else None


def summarize(runs: list[dict]) -> dict:
    out: dict = {"runs": len(runs)}
    for key in ("wall_s", "tok_s", "ttft_s", "req_tok_s", "decode_tok_s"):
        xs = [r[key] for r in runs if r.get(key) is not None]
        if xs:
            out[key] = round(median(xs), 4)
            out[key + "_spread"] = _spread(xs)
    out["tokens"] = median(r["tokens"] for r in runs)
    if any("batches" in r for r in runs):
        out["batches"] = median(r.get("batches", 0) for r in runs)
    keys = sorted({k for r in runs for k in r["phases"]})
    out["phases"] = {k: round(median(r["phases"].get(k, 0.0) for r in runs), 4) for k in keys}
    return out


def paired(a: list[dict], b: list[dict], b_tok_s: str = "tok_s") -> dict:
    """Ratios of a to b within each round (adjacent in time): throughput (b's `b_tok_s`), time to
    first token, wall time."""
    out = {}
    for key, other in (("tok_s", b_tok_s), ("ttft_s", "ttft_s"), ("wall_s", "wall_s")):
        xs = [x[key] / y[other] for x, y in zip(a, b) if x.get(key) and y.get(other)]
        if xs:
            out[key] = {"median": round(median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3)}
    return out


# ---------------------------------------------------------------------------------------- report
def cprofile_round(switch, names: list[str], n: int, max_tokens: int, top: int = 25) -> str:
    """cProfile of one library round of `auto` (the worker's call), by cumulative time."""
    import cProfile
    import io
    import pstats

    reqs = requests_for(n, names, 0)
    prof = cProfile.Profile()
    prof.enable()
    library_run(switch, reqs, "auto", max_tokens)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def measure(args, switch, modes: set[str], server: ServerProcess | None, report: dict) -> None:
    """This process's compile (with --compile, while the server compiles its own), then the library
    phases and the server's."""
    if args.compile:
        from loraswitch.server.cli import prepare_engine

        t0 = time.perf_counter()
        prepare_engine(switch.engine, True, switch.engine.prefix_tokens, None, args.compile_context)
        report["compile_s"] = round(time.perf_counter() - t0, 1)
    if server is not None:  # nothing else running while the library is timed
        t0 = time.perf_counter()
        server.wait_ready(timeout=1800)
        print(f"server ready ({time.perf_counter() - t0:.0f} s after this process's set-up)", flush=True)
    report.update(prefix_cache=switch.engine.prefix_tokens, fresh_prompts=args.fresh_prompts)
    names = [n for n in switch.engine.names if not n.startswith("added_")]  # `--grow`'s get no requests
    if "library" in modes:
        for k, n in enumerate(args.concurrency):
            report["library"][str(n)] = library_phase(args, switch, names, n, k == 0 or args.fresh_prompts)
        if args.cprofile:
            report["cprofile"] = cprofile_round(switch, names, max(args.concurrency), args.max_tokens)
    if server is not None:
        report["server"] = server_phases(args, switch, names, server)


def grown_router_dir(args) -> Path:
    """A scratch copy of the routers, so the heads of the adapters `grow` adds go nowhere else."""
    import atexit
    import shutil
    import tempfile

    from loraswitch.constants import DEMO_ROUTER_DIR

    scratch = Path(tempfile.mkdtemp(prefix="loraswitch-grow-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    shutil.copytree(args.router_dir or DEMO_ROUTER_DIR, scratch / "routers")
    return scratch / "routers"


def grow(switch, n: int) -> None:
    """The library grown by `n` random adapters after the selector was trained: each gets a
    zero-shot head (`routing.added`), and `auto` must read what they may claim."""
    from loraswitch.bench.fixtures import random_adapters
    from loraswitch.library import Adapter

    for a in random_adapters(switch.engine.model, n, 8, seed=7):
        switch.engine.add_adapter(Adapter(f"added_{a.name}", a.modules))
    switch.router("auto").route(switch.engine, ["warm the added heads"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated numbers of concurrent requests")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--modes", default="library,server")
    p.add_argument("--quick", action="store_true", help="2 rounds each (a few minutes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, here and in the server")
    p.add_argument("--time-limit", type=float, default=600)
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="")
    p.add_argument("--doc", help="write the summary into this markdown file (generated block auto-cost)")
    p.add_argument("--prefix-cache", type=int, help="cached prefill positions (Engine.prefix_tokens, serve "
                   "--prefix-cache) here and in the server; 0: off (default: the engine's)")
    p.add_argument("--ignore-eos", action="store_true", help="every answer decodes max_tokens tokens (the requests' "
                   "ignore_eos, vLLM's): served tokens/s against the engine's forced decode on the same work")
    p.add_argument("--fresh-prompts", action="store_true", help="each round asks new prompts of the same tasks "
                   "(the same for every configuration of the round) instead of repeating one set")
    p.add_argument("--base", help="model directory or .gguf (default: the embedded SmolLM2)")
    p.add_argument("--adapter-dir", action="append", help="PEFT adapter folder (repeatable; default: the demo's); "
                   "adapters named after demo tasks get that task's prompts")
    p.add_argument("--router-dir", help="trained routers for these adapters (default: the demo's)")
    p.add_argument("--compile", action="store_true", help="decode on the compiled step, here and in the server")
    p.add_argument("--compile-context", type=int, default=128, help="with --compile: positions compiled for up front")
    p.add_argument("--server-log", help="keep the server's log in this file (default: removed when it stops)")
    p.add_argument("--grow", type=int, default=0, help="add this many random adapters after training (zero-shot "
                   "heads; library only): what `auto` costs once the library has grown")
    p.add_argument("--fast-sure", type=float, help="override routing.seq.FAST_SURE in the library (1.01: every "
                   "prompt read at the main layer once the library has grown, the behaviour before it)")
    p.add_argument("--no-resume", action="store_true", help="in the library, every read at the main layer starts "
                   "again from the first layer (the behaviour before `features.resuming`)")
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if args.quick:
        args.repeats = min(args.repeats, 2)
    os.environ["LORASWITCH_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from loraswitch.switch import Switch

    modes = {m.strip() for m in args.modes.split(",")}
    if args.grow and "server" in modes:
        p.error("--grow measures the library only (--modes library)")
    switch = Switch(args.base, args.adapter_dir, grown_router_dir(args) if args.grow else args.router_dir)
    if args.grow:
        grow(switch, args.grow)
    if args.fast_sure is not None:
        from loraswitch.routing import seq

        seq.FAST_SURE = args.fast_sure
    if args.no_resume:
        from loraswitch.routing import features

        features._resumable = lambda engine: False
    device = next(switch.engine.model.parameters()).device
    card = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    report: dict = {"started_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_start": load(),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} torch thread(s), "
                               f"device {device}{card}" + (", compiled step" if args.compile else ""),
                    "argv": sys.argv[1:] if argv is None else argv, "max_tokens": args.max_tokens,
                    "repeats": args.repeats, "library": {}, "server": {}}
    if args.prefix_cache is not None:
        switch.engine.prefix_tokens = args.prefix_cache
    server = start_server(args, switch) if "server" in modes else None
    try:
        measure(args, switch, modes, server, report)
    finally:
        if server is not None:
            server.stop()
    report["load_end"] = load()
    report["finished_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    from auto_cost_report import markdown

    save_report("auto_cost" + (f"_{args.tag}" if args.tag else ""), report, markdown(report), args.doc, "auto-cost")
    return 0


if __name__ == "__main__":
    sys.exit(main())
