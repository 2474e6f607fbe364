"""Load test of `loraswitch serve` over loopback: many concurrent chat requests across adapters
and `auto`, against a server this script starts (and stops) itself on 127.0.0.1.

Reports throughput, latency percentiles, status codes (target: no 5xx, nothing lost), the batch
sizes the scheduler formed, answer accuracy on the demo tasks, and, with --compare, the speedup
of batching over one-request-at-a-time (the same requests against `--max-batch 1`).
Writes JSON and a markdown summary into benchmarks/results/.

    python benchmarks/load_server.py                              # 200 requests, batched vs --max-batch 1
    python benchmarks/load_server.py --requests 8 --max-tokens 4  # a smoke run

Arrival-rate mode (`--rate R`): the requests arrive over time, as a Poisson process of R requests
a second (seeded), instead of all at once; with `--continuous-compare` the same arrivals are
served with continuous batching on and off (`serve --no-continuous`), alternating `--repeats`
times, and the medians of served completion tokens/s and time to first token are compared
(the result files get the suffix `_arrivals`):

    python benchmarks/load_server.py --rate 1.5 --requests 48 --continuous-compare --stream-fraction 1

Bounded: at most --requests requests, at most --time-limit seconds per phase; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
HOST = "127.0.0.1"  # loopback only, by design


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class ServerProcess:
    """`python -m loraswitch.server ARGS` in a subprocess on a free loopback port: the one way the
    benchmarks start a server (load, soak, Ray Serve, edge/central). Ready when /healthz answers;
    `stop` sends SIGTERM, then kills. The log goes to `log`, or to a scratch file removed on stop."""

    stop_wait = 20.0  # seconds between SIGTERM and kill

    def __init__(self, args: list[str], threads: int | None = None, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        cmd = [sys.executable, "-m", "loraswitch.server", "--host", HOST, "--port", str(self.port), *args]
        env = dict(os.environ, **({"LORASWITCH_THREADS": str(threads)} if threads else {}))
        self.keep_log = log is not None
        self.log = open(log or RESULTS / f".server-{self.port}.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def wait_ready(self, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                r = httpx.get(self.url + "/healthz", timeout=2)
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("server did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(self.stop_wait)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()
        if not self.keep_log:
            Path(self.log.name).unlink(missing_ok=True)


def serve_args(args: argparse.Namespace, max_batch: int) -> list[str]:
    """The load test's server flags: batch, queue and time limits, greedy, the chosen library."""
    out = ["--max-batch", str(max_batch), "--max-queue", str(args.requests + 16), "--timeout", str(args.time_limit),
           "--max-new-tokens", str(max(args.max_tokens, 1)), "--default-temperature", "0", "--log-level", "warning"]
    out += getattr(args, "serve_extra", None) or []
    return out + library_args(args)


def library_args(args: argparse.Namespace) -> list[str]:
    """`serve`'s flags for the run's library and decode step: --base, --adapter-dir, --router-dir,
    --compile (and --compile-context where the run has one)."""
    out = ["--compile"] if getattr(args, "compile", False) else []
    if getattr(args, "compile", False) and getattr(args, "compile_context", None):
        out += ["--compile-context", str(args.compile_context)]
    if getattr(args, "base", None):
        out += ["--base", args.base]
    for d in getattr(args, "adapter_dir", None) or []:
        out += ["--adapter-dir", str(d)]
    if getattr(args, "router_dir", None):
        out += ["--router-dir", str(args.router_dir)]
    return out


class Server(ServerProcess):
    """The load test's server: `serve_args` of the run's options."""

    def __init__(self, args: argparse.Namespace, max_batch: int):
        super().__init__(serve_args(args, max_batch), args.threads)


def save_report(stem: str, report: dict, text: str, doc: str | None = None, block: str | None = None, **doc_kw) -> None:
    """A benchmark's results: `stem`.json (the measurements) and `stem`.md (`text`) under
    benchmarks/results, `text` printed, and with `doc` written into that file's generated
    `block` (what every script's --doc does)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)
    if doc:
        from loraswitch.eval.report import update_doc

        update_doc(Path(doc), block, text, **doc_kw)


def build_requests(n: int, models: list[str], seed: int) -> list[dict]:
    """Chat requests cycling over `models`; prompts from the demo tasks (an adapter named like a
    task gets that task's prompts, `auto` and `base` a mix), so answers can be scored. A task's
    k-th request gets its k-th prompt: distinct prompts up to the pool's size (n // tasks + 2 per
    task; request i used to take prompt i mod 8, so 32 requests over 8 tasks asked each of 8
    prompts four times)."""
    from loraswitch.demo.tasks import TASK_NAMES, examples

    rng = random.Random(seed)
    pool = {t: examples(t, "test", max(8, n // max(1, len(TASK_NAMES)) + 2), seed=seed) for t in TASK_NAMES}
    asked = dict.fromkeys(pool, 0)
    out = []
    for i in range(n):
        model = models[i % len(models)]
        task = model if model in pool else rng.choice(list(TASK_NAMES))
        ex = pool[task][asked[task] % len(pool[task])]
        asked[task] += 1
        out.append({"model": model, "task": task, "prompt": ex.prompt, "answer": ex.answer})
    return out


async def one(client: httpx.AsyncClient, req: dict, max_tokens: int, stream: bool, ignore_eos: bool = False) -> dict:
    body = {"model": req["model"], "messages": [{"role": "user", "content": req["prompt"]}],
            "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if ignore_eos:  # every answer max_tokens long (vLLM's ignore_eos)
        body["ignore_eos"] = True
    t0 = time.perf_counter()
    rec = {"model": req["model"], "task": req["task"], "answer": req["answer"], "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    try:
        if not stream:
            r = await client.post("/v1/chat/completions", json=body)
            rec["status"] = r.status_code
            data = r.json()
            if r.status_code == 200:
                rec.update(text=data["choices"][0]["message"]["content"], tokens=data["usage"]["completion_tokens"],
                           batch=data["batch"]["size"], answered=data["model"])
            else:
                rec["error"] = data.get("error", {}).get("message")
        else:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                rec["status"] = r.status_code
                text, final = [], None
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    msg = json.loads(line[6:])
                    if "error" in msg:
                        rec["status"], rec["error"] = 500, msg["error"]["message"]
                        break
                    if msg.get("usage"):
                        rec["tokens"] = msg["usage"]["completion_tokens"]
                    choice = msg["choices"][0] if msg.get("choices") else None
                    if choice and choice["delta"].get("content"):
                        if "ttft" not in rec:
                            rec["ttft"] = time.perf_counter() - t0
                        text.append(choice["delta"]["content"])
                    if choice and choice.get("finish_reason"):
                        final = msg
                if final is not None:
                    rec.update(text="".join(text), batch=final["batch"]["size"], answered=final["model"])
                elif rec["status"] == 200:
                    rec["status"], rec["error"] = 599, "stream ended without a final chunk"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        rec["status"], rec["error"] = 0, f"{type(exc).__name__}: {exc}"
    rec["latency"] = time.perf_counter() - t0
    return rec


async def phase(url: str, reqs: list[dict], args: argparse.Namespace) -> dict:
    """Send every request with at most --concurrency in flight; bounded by --time-limit."""
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=args.time_limit, limits=limits) as client:
        for model in sorted({r["model"] for r in reqs}):  # warm-up: routers and caches, not measured
            await one(client, {"model": model, "task": "", "prompt": "Hello", "answer": ""}, 2, False)
        gate = asyncio.Semaphore(args.concurrency)
        rng = random.Random(args.seed)
        streams = [rng.random() < args.stream_fraction for _ in reqs]
        due = arrival_times(len(reqs), getattr(args, "rate", 0.0), args.seed)

        async def guarded(req, stream, at):
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            async with gate:
                return await one(client, req, args.max_tokens, stream)

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(guarded(r, s, at)) for r, s, at in zip(reqs, streams, due)]
        done, pending = await asyncio.wait(tasks, timeout=args.time_limit)
        for t in pending:
            t.cancel()
        wall = time.perf_counter() - t0
    records = [t.result() for t in done if not t.cancelled() and t.exception() is None]
    return summarize(records, len(reqs), wall)


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """When each request is sent, in seconds from the start: all at once without a rate, else a
    Poisson process of `rate` requests a second (exponential gaps), the same for a given seed."""
    if not rate or rate <= 0:
        return [0.0] * n
    rng, t, out = random.Random(seed + 1), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def summarize(records: list[dict], sent: int, wall: float) -> dict:
    from loraswitch.demo.tasks import score

    ok = [r for r in records if r.get("status") == 200]
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r.get("status"))] = statuses.get(str(r.get("status")), 0) + 1
    lat = [r["latency"] for r in ok]
    acc: dict[str, list[int]] = {}
    for r in ok:
        if r["task"] and r.get("answer"):
            kind = r["model"] if r["model"] in ("auto", "base") else "adapter"
            acc.setdefault(kind, []).append(int(score(r["task"], r.get("text", ""), r["answer"])))
    tokens = sum(r.get("tokens") or 0 for r in ok)
    batches = [r["batch"] for r in ok if r.get("batch")]
    return {
        "sent": sent, "answered": len(records), "ok": len(ok), "lost": sent - len(records),
        "statuses": statuses, "errors_5xx": sum(1 for r in records if int(r.get("status", 0)) >= 500),
        "transport_errors": sum(1 for r in records if r.get("status") == 0),
        "wall_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 3) if wall else None,
        "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 2) if wall else None,
        "latency_s": {"p50": _r(percentile(lat, 0.5)), "p90": _r(percentile(lat, 0.9)), "p99": _r(percentile(lat, 0.99)),
                      "max": _r(max(lat) if lat else None), "mean": _r(statistics.fmean(lat) if lat else None)},
        "ttft_s_stream": {"p50": _r(percentile([r["ttft"] for r in ok if "ttft" in r], 0.5)),
                          "p99": _r(percentile([r["ttft"] for r in ok if "ttft" in r], 0.99))},
        "batch_size": {"mean": _r(statistics.fmean(batches) if batches else None), "max": max(batches, default=None)},
        "accuracy": {k: {"n": len(v), "correct": sum(v), "rate": _r(sum(v) / len(v))} for k, v in acc.items() if v},
        "sample_errors": [r.get("error") for r in records if r.get("status") != 200][:5],
    }


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


def run_phase(args: argparse.Namespace, max_batch: int, reqs: list[dict] | Callable[[dict], list[dict]]) -> dict:
    """One server, one load; `reqs` may be built from the server's /healthz (its adapters)."""
    server = Server(args, max_batch)
    try:
        health = server.wait_ready()
        if callable(reqs):
            reqs = reqs(health)
        t0 = time.time()
        result = asyncio.run(phase(server.url, reqs, args))
        result["max_batch"] = max_batch
        result["adapters"] = health.get("adapters")
        result["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0))
        result["requests"] = reqs
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        result["server_batches"] = _metric(metrics, "loraswitch_batch_size_count")
        result["server_rows"] = _metric(metrics, "loraswitch_batch_size_sum")
        stats = httpx.get(server.url + "/healthz", timeout=10).json().get("scheduler", {})
        result["scheduler"] = {k: stats.get(k) for k in ("rounds", "batches", "rows", "joined", "max_batch_size")}
        return result
    finally:
        server.stop()


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [f"# Server load test ({report['finished_at']})", "",
             f"{cfg['requests']} chat requests, at most {cfg['concurrency']} in flight, max_tokens {cfg['max_tokens']}, "
             f"greedy, {int(cfg['stream_fraction'] * 100)}% streamed; models cycled: {', '.join(cfg['models'])}.",
             f"Server and client share this machine ({report['machine']}); loopback only.", "",
             "| server | ok | lost | 5xx | req/s | tokens/s | p50 s | p99 s | mean batch | accuracy (adapter / auto) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, res in report["phases"].items():
        a = res.get("accuracy", {})
        acc = " / ".join(f"{a[k]['rate']:.0%}" if k in a else "-" for k in ("adapter", "auto"))
        lines.append(f"| {key} (max batch {res['max_batch']}) | {res['ok']}/{res['sent']} | {res['lost']} | "
                     f"{res['errors_5xx']} | {res['requests_per_s']} | {res['tokens_per_s']} | {res['latency_s']['p50']} | "
                     f"{res['latency_s']['p99']} | {res['batch_size']['mean']} | {acc} |")
    if report.get("speedup") is not None:
        lines += ["", f"**Batching speedup (throughput, batched / one at a time): {report['speedup']:.2f}x**"]
    lines += ["", "Reproduce: `python benchmarks/load_server.py " + " ".join(report["argv"]) + "`", ""]
    return "\n".join(lines)


CONTINUOUS = {"continuous": [], "no_continuous": ["--no-continuous"]}


def continuous_compare(args: argparse.Namespace, make_requests, models: list[str], argv) -> int:
    """The same requests, arriving at the same times, served with continuous batching on and off,
    `--repeats` pairs alternating (which goes first alternates too); medians compared."""
    runs: dict[str, list[dict]] = {k: [] for k in CONTINUOUS}
    reqs = make_requests
    for k in range(args.repeats):
        order = list(CONTINUOUS) if k % 2 == 0 else list(reversed(CONTINUOUS))
        for mode in order:
            args.serve_extra = CONTINUOUS[mode]
            res = run_phase(args, args.max_batch, reqs)
            reqs = res.pop("requests")
            res["load"] = [round(x, 2) for x in os.getloadavg()]
            runs[mode].append(res)
            print(mode, json.dumps({key: res[key] for key in ("ok", "lost", "tokens_per_s", "ttft_s_stream", "wall_s")}),
                  flush=True)
    report = {
        "finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "config": {"requests": args.requests, "rate": args.rate, "max_tokens": args.max_tokens, "models": models,
                   "stream_fraction": args.stream_fraction, "max_batch": args.max_batch, "repeats": args.repeats,
                   "threads": args.threads, "concurrency": args.concurrency, "compile": args.compile},
        "argv": sys.argv[1:] if argv is None else argv, "runs": runs, "summary": _compare_summary(runs),
    }
    save_report("server_load_arrivals" + (f"_{args.tag}" if args.tag else ""), report, compare_markdown(report),
                args.doc, "continuous-batching" + (f"-{args.tag}" if args.tag else ""))
    return 1 if sum(r["errors_5xx"] + r["lost"] for rs in runs.values() for r in rs) else 0


def _compare_summary(runs: dict[str, list[dict]]) -> dict:
    def med(mode, get):
        xs = [x for x in (get(r) for r in runs[mode]) if x is not None]
        return _r(statistics.median(xs)) if xs else None

    out = {mode: {"tokens_per_s": med(mode, lambda r: r["tokens_per_s"]),
                  "ttft_p50_s": med(mode, lambda r: r["ttft_s_stream"]["p50"]),
                  "ttft_p99_s": med(mode, lambda r: r["ttft_s_stream"]["p99"]),
                  "latency_p50_s": med(mode, lambda r: r["latency_s"]["p50"]),
                  "latency_p99_s": med(mode, lambda r: r["latency_s"]["p99"]),
                  "mean_batch": med(mode, lambda r: r["batch_size"]["mean"])} for mode in runs}
    on, off = out["continuous"], out["no_continuous"]
    if on["tokens_per_s"] and off["tokens_per_s"]:
        out["tokens_per_s_ratio"] = round(on["tokens_per_s"] / off["tokens_per_s"], 3)
    if on["ttft_p50_s"] and off["ttft_p50_s"]:
        out["ttft_p50_ratio"] = round(on["ttft_p50_s"] / off["ttft_p50_s"], 3)
    return out


def compare_markdown(report: dict) -> str:
    cfg, s = report["config"], report["summary"]
    arrivals = f"arriving as a Poisson process of {cfg['rate']}/s" if cfg["rate"] else "sent at once"
    lines = [f"# Continuous batching under arriving requests ({report['finished_at']})", "",
             f"{cfg['requests']} chat requests {arrivals}, max_tokens "
             f"{cfg['max_tokens']}, greedy, {int(cfg['stream_fraction'] * 100)}% streamed, --max-batch {cfg['max_batch']}, "
             f"server threads {cfg['threads'] or 'all'}{', the compiled step (--compile)' if cfg.get('compile') else ''}; "
             f"models cycled: {', '.join(cfg['models'])}. "
             f"Medians of {cfg['repeats']} run(s) each, on and off alternating; the same arrivals every run. "
             f"Server and client share this machine ({report['machine']}); loopback only.", "",
             "| serving | ok | completion tokens/s | TTFT p50 s | TTFT p99 s | latency p50 s | latency p99 s | "
             "batch size a request started in (mean) | rounds / rows joined (per run) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, runs in report["runs"].items():
        m = s[mode]
        ok = "/".join(str(sum(r[k] for r in runs)) for k in ("ok", "sent"))
        sched = ", ".join(f"{r['scheduler'].get('rounds')} / {r['scheduler'].get('joined')}" for r in runs)
        lines.append(f"| {mode.replace('_', ' ')} | {ok} | {m['tokens_per_s']} | {m['ttft_p50_s']} | {m['ttft_p99_s']} | "
                     f"{m['latency_p50_s']} | {m['latency_p99_s']} | {m['mean_batch']} | {sched} |")
    lines += ["", f"Continuous / not: completion tokens/s **{s.get('tokens_per_s_ratio')}x**, "
                  f"TTFT p50 **{s.get('ttft_p50_ratio')}x**. Per run (tokens/s, TTFT p50, load average): " +
              "; ".join(f"{mode} {r['tokens_per_s']} / {r['ttft_s_stream']['p50']} / {r['load']}"
                        for mode, rs in report["runs"].items() for r in rs),
              "", "Reproduce: `python benchmarks/load_server.py " + " ".join(report["argv"]) + "`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=200, help="requests in flight at once")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--models", default="", help="comma-separated; default: every adapter plus auto")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--no-compare", action="store_true", help="skip the --max-batch 1 run")
    p.add_argument("--compare-requests", type=int, default=0, help="requests for the --max-batch 1 run (default: same)")
    p.add_argument("--stream-fraction", type=float, default=0.25)
    p.add_argument("--time-limit", type=float, default=900, help="seconds per phase; unfinished requests count as lost")
    p.add_argument("--base")
    p.add_argument("--adapter-dir", action="append")
    p.add_argument("--router-dir")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the server (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the result file names")
    p.add_argument("--doc", help="also write the result table into this markdown file (generated block), e.g. docs/server.md")
    p.add_argument("--rate", type=float, default=0.0, help="requests arriving per second (Poisson); 0: all at once")
    p.add_argument("--continuous-compare", action="store_true",
                   help="serve the same arrivals with continuous batching on and off (instead of the --max-batch 1 run)")
    p.add_argument("--repeats", type=int, default=1, help="with --continuous-compare: on/off pairs, alternating")
    p.add_argument("--compile", action="store_true",
                   help="serve --compile: the compiled decode step (each server start compiles its first graphs)")
    args = p.parse_args(argv)
    if args.requests < 1 or args.requests > 5000 or args.concurrency < 1:
        p.error("--requests must be 1..5000 and --concurrency at least 1")
    RESULTS.mkdir(parents=True, exist_ok=True)

    models: list[str] = [m.strip() for m in args.models.split(",") if m.strip()]

    def make_requests(health: dict) -> list[dict]:
        if not models:  # every adapter the server loaded, plus auto
            models.extend([*health["adapters"], "auto"])
        return build_requests(args.requests, models, args.seed)

    if args.continuous_compare:
        return continuous_compare(args, make_requests, models, argv)
    phases = {"batched": run_phase(args, args.max_batch, make_requests)}
    reqs = phases["batched"].pop("requests")
    print(json.dumps({"batched": phases["batched"]}, indent=1), flush=True)
    speedup = None
    if not args.no_compare:
        n = args.compare_requests or args.requests
        phases["one_at_a_time"] = run_phase(args, 1, reqs[:n])
        phases["one_at_a_time"].pop("requests")
        a, b = phases["batched"]["requests_per_s"], phases["one_at_a_time"]["requests_per_s"]
        speedup = round(a / b, 3) if a and b else None
    report = {
        "finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "config": {"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                   "models": models, "stream_fraction": args.stream_fraction, "max_batch": args.max_batch},
        "argv": sys.argv[1:] if argv is None else argv,
        "phases": phases, "speedup": speedup,
    }
    save_report("server_load" + (f"_{args.tag}" if args.tag else ""), report, markdown(report), args.doc, "server-load")
    bad = sum(ph["errors_5xx"] + ph["lost"] for ph in phases.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
