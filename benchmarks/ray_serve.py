"""Scale-out benchmark: the same load against `loraswitch serve` (one engine, no Ray) and
`loraswitch serve --ray` with 1 and 2 replicas, each a subprocess this script starts and stops on
127.0.0.1 (the Ray runs start their own local Ray instance and shut it down).

Every engine gets --threads torch threads (default 1), so on a 2-core machine 2 replicas use
both cores where one engine uses one. Reports throughput, p50/p99 latency, lost requests and 5xx
per setup (the load generator is benchmarks/load_server.py's), and writes JSON and markdown into
benchmarks/results/ (and, with --doc, the table into a doc's generated block).

    python benchmarks/ray_serve.py --doc docs/scale-out.md    # 48 requests per setup, ~4 minutes
    python benchmarks/ray_serve.py --requests 8 --max-tokens 4 --replicas 2   # a smoke run
    python benchmarks/ray_serve.py --no-plain --replicas 2 --adapters-per-replica 4 --tag spread --doc docs/scale-out.md

Bounded: at most --requests requests and --time-limit seconds per setup; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_server import RESULTS, Server, ServerProcess, build_requests, phase, save_report, serve_args  # noqa: E402


class RayServer(ServerProcess):
    """`python -m loraswitch.server --ray --replicas N` with the load test's flags."""

    stop_wait = 60.0  # serve --ray stops Serve and its Ray instance on SIGTERM

    def __init__(self, args: argparse.Namespace, replicas: int, per_replica: int | None = None):
        self.replicas = replicas
        spread = ["--adapters-per-replica", str(per_replica)] if per_replica else []
        super().__init__(["--ray", "--replicas", str(replicas), *spread, *serve_args(args, args.max_batch)],
                         args.threads)

    def wait_ready(self, timeout: float = 600) -> dict:
        """/healthz once every replica reports, as the single server's health (its adapters)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = super().wait_ready(deadline - time.monotonic())
            live = health.get("replicas", {})
            if len(live) >= self.replicas:
                return {"adapters": next(iter(live.values()))["adapters"], "replicas": len(live), "replicas_health": live}
            time.sleep(0.5)
        raise TimeoutError("the replicas did not all start")


def measure(server: ServerProcess, args: argparse.Namespace, models: list[str]) -> dict:
    try:
        health = server.wait_ready()
        load = os.getloadavg()[0]  # the machine is shared: how busy it was when this setup ran
        reqs = build_requests(args.requests, models or [*health["adapters"], "auto"], args.seed)
        result = asyncio.run(phase(server.url, reqs, args))
        after = httpx.get(server.url + "/healthz", timeout=10).json()
        result["ingress_retries"] = after.get("retries")
        # adapters written into replicas' layers during the load (at start each replica pages in its first K)
        if "replicas" in after:  # a replica Serve restarted mid-load would count its start as well
            result["page_ins"] = sum(rep.get("page_ins", 0) for rep in after["replicas"].values()) - \
                sum(rep.get("page_ins", 0) for rep in health["replicas_health"].values())
        result["load_avg_1m"] = round((load + os.getloadavg()[0]) / 2, 2)
        return result
    finally:
        server.stop()


def route_cost(threads: int, rounds: int = 3) -> str:
    """What routing `auto` costs next to answering: the router's decision alone vs a whole
    routed answer (16 tokens) on demo prompts, one engine on `threads` threads (the numbers behind
    routing on the replica instead of the ingress; docs/scale-out.md)."""
    import statistics

    import torch

    from loraswitch.generate import SamplingParams
    from loraswitch.switch import Switch

    torch.set_num_threads(threads)
    sw = Switch()
    prompts = ["Spell out in French: 21", "Sort ascending: 42, 7, 19, 3", "What is 347 + 85?",
               "Convert to ISO date: March 5, 2021"]
    texts = [sw.base.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True) for p in prompts]
    params = SamplingParams(max_new_tokens=16, temperature=0)
    router = sw.router("auto")
    router.policy(sw.engine, texts[:1]), sw.chat(prompts[:1], model="auto", params=params)  # warm-up
    decide, answer = [], []
    for _ in range(rounds):
        for text, prompt in zip(texts, prompts):
            t0 = time.perf_counter()
            router.policy(sw.engine, [text])
            decide.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sw.chat([prompt], model="auto", params=params)
            answer.append(time.perf_counter() - t0)
    page = []  # what an adapter's first use costs on a replica that had paged it out
    sw.engine.limit_resident(1)
    for _ in range(rounds):
        for name in sw.engine.names:
            sw.engine.trim()
            if name not in sw.engine.slots:
                t0 = time.perf_counter()
                sw.engine.slot_of(name)
                page.append(time.perf_counter() - t0)
    d, a, g = 1000 * statistics.median(decide), 1000 * statistics.median(answer), 1000 * statistics.median(page)
    return (f"Routing cost ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {threads} thread(s), load avg "
            f"{os.getloadavg()[0]:.1f}): the `auto` router's decision alone takes a median {d:.0f} ms per prompt; a "
            f"whole routed answer of 16 tokens (that decision included) {a:.0f} ms, so routing is {d / a:.0%} of it. "
            f"Paging a paged-out adapter into the layers (`--adapters-per-replica`) takes a median {g:.1f} ms. "
            f"Reproduce: `python benchmarks/ray_serve.py --route-cost`.\n")


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [f"Measured {report['finished_at']} on {report['machine']}: {cfg['requests']} chat requests per setup, "
             f"at most {cfg['concurrency']} in flight, max_tokens {cfg['max_tokens']}, greedy, "
             f"{int(cfg['stream_fraction'] * 100)}% streamed, models cycled over every adapter and `auto`; "
             f"{cfg['threads']} torch thread(s) per engine, max batch {cfg['max_batch']}; client and servers on "
             "this machine, loopback only; load avg: the machine's 1-minute load average during the setup (it is "
             "shared with other work).", "",
             "| setup | engines | ok | lost | 5xx | req/s | tokens/s | p50 s | p99 s | mean batch | adapter page-ins | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in report["setups"].items():
        lines.append(f"| {name} | {res['engines']} | {res['ok']}/{res['sent']} | {res['lost']} | {res['errors_5xx']} | "
                     f"{res['requests_per_s']} | {res['tokens_per_s']} | {res['latency_s']['p50']} | "
                     f"{res['latency_s']['p99']} | {res['batch_size']['mean']} | {res.get('page_ins', '–')} | "
                     f"{res['load_avg_1m']} |")
    lines += ["", "Reproduce: `python benchmarks/ray_serve.py " + " ".join(report["argv"]) + "`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--replicas", default="1,2", help="comma-separated replica counts to measure on Ray")
    p.add_argument("--adapters-per-replica", type=int, default=None,
                   help="also measure each Ray setup with the library spread: at most K adapters per replica")
    p.add_argument("--no-plain", action="store_true", help="skip the plain server (no Ray)")
    p.add_argument("--models", default="", help="comma-separated; default: every adapter plus auto")
    p.add_argument("--stream-fraction", type=float, default=0.25)
    p.add_argument("--time-limit", type=float, default=300, help="seconds per setup; unfinished requests count as lost")
    p.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the result files and of the doc's generated block")
    p.add_argument("--doc", help="also write the table into this markdown file's generated block")
    p.add_argument("--route-cost", action="store_true", help="only measure what routing costs next to answering")
    args = p.parse_args(argv)
    if args.route_cost:
        text = route_cost(args.threads)
        print(text)
        if args.doc:
            from loraswitch.eval.report import update_doc

            update_doc(Path(args.doc), "scale-out-route", text)
        return 0
    if not 1 <= args.requests <= 1000 or args.concurrency < 1:
        p.error("--requests must be 1..1000 and --concurrency at least 1")
    args.base = args.adapter_dir = args.router_dir = None  # load_server.Server: the default library
    RESULTS.mkdir(parents=True, exist_ok=True)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    setups: dict[str, dict] = {}
    if not args.no_plain:
        setups["plain server (no Ray)"] = {**measure(Server(args, args.max_batch), args, models), "engines": 1}
    for n in [int(x) for x in args.replicas.split(",") if x.strip()]:
        name = f"Ray Serve, {n} replica{'s' if n > 1 else ''}"
        setups[name] = {**measure(RayServer(args, n), args, models), "engines": n}
        if args.adapters_per_replica:
            k = args.adapters_per_replica
            setups[f"{name}, {k} adapters each"] = {**measure(RayServer(args, n, k), args, models), "engines": n}
    report = {"finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "config": {k: getattr(args, k) for k in ("requests", "concurrency", "max_tokens", "max_batch",
                                                        "stream_fraction", "threads", "adapters_per_replica")},
              "argv": sys.argv[1:] if argv is None else argv, "setups": setups}
    save_report("ray_serve" + (f"_{args.tag}" if args.tag else ""), report, markdown(report), args.doc,
                "scale-out" + (f"-{args.tag}" if args.tag else ""))
    return 1 if any(s["errors_5xx"] + s["lost"] for s in setups.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
