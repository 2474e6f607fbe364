"""Soak test of `loraswitch serve`: thousands of mixed requests with adapters hot-unloaded and
reloaded under load, against a server this script starts (and stops) on 127.0.0.1.

Why: a probe of a few thousand requests with four unload/reload cycles grew the server from
0.72 to 4.7 GB, and unloading under load changed answers in flight. This run checks the fixes
hold over time: it reports 5xx responses (target 0), lost requests (no response at all, target
0), requests that saw an adapter being unloaded (404 while it was gone: expected, counted apart),
the bad inputs it mixed in (each must be a 4xx) and the server's resident memory over time
(`benchmarks/results/soak_server.png`; target: flat after warm-up).

    python benchmarks/soak_server.py                           # 3000 requests, a cycle every 250
    python benchmarks/soak_server.py --requests 200 --cycle-every 50 --max-tokens 4   # quick

Bounded: at most --requests requests (5000 at most), --time-limit seconds in all; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import threading
import time
from pathlib import Path

import httpx
from load_server import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
HOST = "127.0.0.1"  # loopback only, by design
BAD_BODIES = [  # each answered 5xx or never before the hardening (issue 11); each must be a 4xx now
    {"model": "base", "prompt": "abc \ud800 def"},
    {"model": "base", "messages": [{"role": "user", "content": "hi"}], "seed": 2**64, "temperature": 0.5},
    {"model": "base", "messages": [{"role": "user", "content": "hi"}], "temperature": float("nan")},
    {"model": "auto", "messages": [{"role": "user", "content": "\n".join(f"{i}. add {i} and 1" for i in range(1, 41))}],
     "max_tokens": 16},
    {"model": "base", "messages": [{"role": "user", "content": "word " * 200_000}]},
]


class Server(ServerProcess):
    """`python -m loraswitch.server` in a subprocess on a free loopback port (started and stopped
    as the load test does), its RSS sampled."""

    def __init__(self, args: argparse.Namespace):
        super().__init__(["--max-batch", str(args.max_batch), "--max-queue", "512", "--timeout", "600",
                          "--max-new-tokens", "64", "--default-temperature", "0", "--log-level", "warning"], args.threads)
        self.samples: list[tuple[float, float]] = []  # (seconds since start, RSS in GB)
        self._stop = threading.Event()

    def sample_memory(self, every: float) -> None:
        """Sample the server's resident memory every `every` seconds (in a thread) until stop."""
        import psutil

        proc, t0 = psutil.Process(self.proc.pid), time.monotonic()

        def loop():
            while not self._stop.wait(every):
                try:
                    self.samples.append((round(time.monotonic() - t0, 1), proc.memory_info().rss / 1e9))
                except psutil.Error:
                    return

        threading.Thread(target=loop, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        super().stop()


def build_requests(n: int, adapters: list[str], seed: int) -> list[dict]:
    """A mixed stream: explicit adapters, auto (some multi-part), base, completions, streamed
    and abandoned requests, and now and then a known-bad body."""
    from loraswitch.demo.tasks import TASK_NAMES, examples

    rng = random.Random(seed)
    pool = {t: examples(t, "test", 40, seed=seed) for t in TASK_NAMES}
    out = []
    for i in range(n):
        roll = rng.random()
        task = rng.choice(list(TASK_NAMES))
        prompt = rng.choice(pool[task]).prompt
        req = {"i": i, "kind": "chat", "stream": rng.random() < 0.25, "abandon": False,
               "body": {"model": rng.choice([*adapters, "auto", "auto", "base"]),
                        "messages": [{"role": "user", "content": prompt}], "temperature": 0}}
        if roll < 0.03:
            req.update(kind="bad", stream=False, body=dict(rng.choice(BAD_BODIES)))
        elif roll < 0.10:
            parts = [rng.choice(pool[rng.choice(list(TASK_NAMES))]).prompt for _ in range(rng.randint(2, 4))]
            req["body"].update(model="auto", messages=[{"role": "user", "content": "\n".join(
                f"{k}. {p}" for k, p in enumerate(parts, 1))}], max_tokens=48)
        elif roll < 0.20:
            req.update(kind="completion", body={"model": req["body"]["model"], "prompt": prompt, "temperature": 0})
        elif roll < 0.23:
            req.update(abandon=True, stream=False)
            req["body"]["max_tokens"] = 64
        if rng.random() < 0.15 and req["kind"] != "bad":
            req["body"].update(temperature=0.7, top_p=0.9)
        out.append(req)
    return out


async def send(client: httpx.AsyncClient, req: dict, max_tokens: int) -> dict:
    body = {"max_tokens": max_tokens, **req["body"], "stream": req["stream"]}
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    rec = {"i": req["i"], "kind": req["kind"], "model": body.get("model"), "t": time.monotonic()}
    try:
        if req["abandon"]:  # the client gives up: the server must cancel, not decode to the end
            await client.post(path, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=1.0)
            rec["status"] = "answered-before-abandon"
        elif req["stream"]:
            async with client.stream("POST", path, json=body) as r:
                rec["status"] = r.status_code
                if r.status_code >= 400:
                    rec["code"] = json.loads(await r.aread()).get("error", {}).get("code")
                    return _done(rec)
                async for line in r.aiter_lines():
                    if line.startswith("data: {\"error\""):
                        rec["status"] = json.loads(line[6:])["error"].get("code") or "stream-error"
                    if line == "data: [DONE]":
                        rec["done"] = True
                if r.status_code == 200 and not rec.get("done"):
                    rec["status"] = "lost"
        else:
            r = await client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
            rec["status"] = r.status_code
            if r.status_code >= 400:
                rec["code"] = r.json().get("error", {}).get("code")
    except httpx.TimeoutException:
        rec["status"] = "abandoned" if req["abandon"] else "lost"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        rec["status"], rec["error"] = "lost", f"{type(exc).__name__}: {exc}"
    return _done(rec)


def _done(rec: dict) -> dict:
    rec["seconds"] = round(time.monotonic() - rec["t"], 3)
    return rec


async def cycle(client: httpx.AsyncClient, name: str, path: str, log: list[dict], t0: float) -> None:
    """Unload `name` under load, wait until it left, load it back (a hot unload/reload cycle)."""
    started = time.monotonic()
    r = await client.delete(f"/v1/adapters/{name}")
    entry = {"t": round(started - t0, 1), "adapter": name, "delete_status": r.status_code,
             "delete_s": round(time.monotonic() - started, 3)}
    for _ in range(600):  # at most ~5 minutes
        listed = (await client.get("/v1/adapters")).json()["data"]
        if name not in [a["id"] for a in listed]:
            break
        await asyncio.sleep(0.5)
    r = await client.post("/v1/adapters", json={"path": path, "name": name})
    entry.update(load_status=r.status_code, cycle_s=round(time.monotonic() - started, 3))
    log.append(entry)


async def soak(url: str, reqs: list[dict], adapters: dict[str, str], args: argparse.Namespace) -> dict:
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    cycles: list[dict] = []
    finished = [0]
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as client:
        gate = asyncio.Semaphore(args.concurrency)
        t0 = time.monotonic()
        names = sorted(adapters)

        async def guarded(req):
            async with gate:
                try:
                    return await send(client, req, args.max_tokens)
                finally:
                    finished[0] += 1

        async def cycler():  # one unload/reload at a time, every --cycle-every answered requests
            k = 1
            while finished[0] < len(reqs) and time.monotonic() - t0 < args.time_limit:
                if finished[0] >= k * args.cycle_every:
                    await cycle(client, names[(k - 1) % len(names)], adapters[names[(k - 1) % len(names)]], cycles, t0)
                    k += 1
                await asyncio.sleep(0.2)

        cyclers = [asyncio.create_task(cycler())]
        tasks = []
        for req in reqs:
            tasks.append(asyncio.create_task(guarded(req)))
            while len(tasks) - finished[0] >= 2 * args.concurrency:  # a bounded backlog
                await asyncio.sleep(0.05)
            if time.monotonic() - t0 > args.time_limit:
                break
        left = max(1.0, args.time_limit - (time.monotonic() - t0))
        done, pending = await asyncio.wait(tasks + cyclers, timeout=left)
        for t in pending:
            t.cancel()
        records = [t.result() for t in tasks if t in done]
        records += [{"i": -1, "status": "lost", "error": "unfinished at --time-limit"} for t in tasks if t in pending]
        return {"records": records, "cycles": cycles, "wall_s": round(time.monotonic() - t0, 1)}


def summarize(run: dict, reqs: list[dict], samples: list[tuple[float, float]]) -> dict:
    records = run["records"]
    by_status: dict[str, int] = {}
    for r in records:
        by_status[str(r["status"])] = by_status.get(str(r["status"]), 0) + 1
    errors_5xx = sum(1 for r in records if isinstance(r["status"], int) and r["status"] >= 500)
    stream_errors = sum(1 for r in records if isinstance(r["status"], str) and r["status"] not in
                        ("lost", "abandoned", "answered-before-abandon", "model_not_found"))
    bad = [r for r in records if r.get("kind") == "bad"]
    rss = [gb for _, gb in samples]
    warm = rss[len(rss) // 10:] or rss
    return {
        "sent": len(reqs), "finished": len(records), "by_status": dict(sorted(by_status.items())),
        "errors_5xx": errors_5xx + stream_errors, "lost": by_status.get("lost", 0),
        "unloaded_404": sum(1 for r in records if r.get("code") == "model_not_found" or r["status"] == "model_not_found"),
        "bad_inputs": {"sent": len(bad), "answered_4xx": sum(1 for r in bad if isinstance(r["status"], int)
                                                                and 400 <= r["status"] < 500)},
        "abandoned": sum(1 for r in records if r["status"] == "abandoned"),
        "cycles": run["cycles"], "wall_s": run["wall_s"],
        "rss_gb": {"first": _r(rss[0]) if rss else None, "after_warmup": _r(warm[0]) if warm else None,
                   "last": _r(rss[-1]) if rss else None, "max": _r(max(rss)) if rss else None,
                   "growth_after_warmup": _r(warm[-1] - warm[0]) if warm else None},
    }


def _r(x: float) -> float:
    return round(x, 3)


def plot(samples: list[tuple[float, float]], cycles: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot([t for t, _ in samples], [gb for _, gb in samples], color="#1f77b4", label="server RSS")
    for k, c in enumerate(cycles):
        ax.axvline(c["t"], color="#d62728", alpha=0.4, lw=1, label="unload + reload" if k == 0 else None)
    ax.set_xlabel("seconds")
    ax.set_ylabel("resident memory (GB)")
    ax.set_ylim(bottom=0)
    ax.set_title("loraswitch serve under soak: resident memory")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict) -> str:
    s, cfg = report["summary"], report["config"]
    rss = s["rss_gb"]
    delete_s = [c["delete_s"] for c in s["cycles"]]
    return "\n".join([
        f"{s['sent']} requests ({cfg['concurrency']} in flight, max_tokens {cfg['max_tokens']}, max batch "
        f"{cfg['max_batch']}): chat to every adapter, `auto` (some multi-part), `base`, completions, 25% streamed, "
        f"3% abandoned by the client after 1 s, 3% known-bad bodies; an adapter unloaded and reloaded every "
        f"{cfg['cycle_every']} requests ({len(s['cycles'])} cycles). Server and client share this machine "
        f"({report['machine']}); loopback only. Finished {report['finished_at']}.", "",
        "| 5xx | lost | answered | 404 while unloaded | bad inputs -> 4xx | abandoned | DELETE answered in (max) | "
        "RSS after warm-up -> last (max) | wall |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {s['errors_5xx']} | {s['lost']} | {s['by_status'].get('200', 0)} | {s['unloaded_404']} | "
        f"{s['bad_inputs']['answered_4xx']}/{s['bad_inputs']['sent']} | {s['abandoned']} | "
        f"{max(delete_s) if delete_s else '-'} s | {rss['after_warmup']} -> {rss['last']} GB ({rss['max']}) | "
        f"{s['wall_s']} s |", "",
        "![resident memory over the soak](soak_server.png)", "",
        "Reproduce: `python benchmarks/soak_server.py " + " ".join(report["argv"]) + "`", ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--cycle-every", type=int, default=250, help="requests between unload/reload cycles")
    p.add_argument("--time-limit", type=float, default=3600, help="seconds in all; unfinished requests are lost")
    p.add_argument("--request-timeout", type=float, default=600)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--doc", help="also write the summary into this markdown file (generated block)")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 5000 or args.concurrency < 1 or args.cycle_every < 1:
        p.error("--requests must be 1..5000, --concurrency and --cycle-every at least 1")
    RESULTS.mkdir(parents=True, exist_ok=True)
    server = Server(args)
    try:
        health = server.wait_ready()
        server.sample_memory(2.0)
        from loraswitch.constants import DEMO_ADAPTER_DIR

        adapters = {n: str(DEMO_ADAPTER_DIR / n) for n in health["adapters"]}
        reqs = build_requests(args.requests, list(adapters), args.seed)
        run = asyncio.run(soak(server.url, reqs, adapters, args))
        time.sleep(4)  # a last memory sample or two after the load
    finally:
        server.stop()
    report = {"finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
              "config": {k: getattr(args, k) for k in ("requests", "concurrency", "max_tokens", "max_batch",
                                                       "cycle_every", "seed")},
              "argv": sys.argv[1:] if argv is None else argv,
              "summary": summarize(run, reqs, server.samples), "rss_samples": server.samples}
    (RESULTS / "soak_server.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(server.samples, report["summary"]["cycles"], RESULTS / "soak_server.png")
    (RESULTS / "soak_server.md").write_text(f"# Server soak test\n\n{markdown(report)}")
    print(json.dumps(report["summary"], indent=1))
    if args.doc:
        from loraswitch.eval.report import update_doc

        update_doc(Path(args.doc), "server-soak", markdown(report), images_from=RESULTS)
    s = report["summary"]
    return 1 if s["errors_5xx"] or s["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
