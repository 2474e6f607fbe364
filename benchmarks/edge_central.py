"""Escalation measured in an edge / central setup on loopback (issue 15).

    python benchmarks/edge_central.py                       # demo library, 40 test prompts per task
    python benchmarks/edge_central.py --doc docs/escalation.md   # also rewrite the docs block
    python benchmarks/edge_central.py --library bigbench --per-task 30

Three real `loraswitch serve` processes on 127.0.0.1, all on the embedded base model:

* central: the whole library (8 demo adapters) and its routers;
* edge (escalating): half the library (`--edge-adapters`, default 4 of the 8) and the same
  routers, `--upstream <central> --upstream-model auto --escalate-rate R --calibration <val>`:
  the threshold is calibrated on the library's *validation* prompts, then every *test* prompt is
  sent to the edge;
* edge (local only): the same edge with `--escalate-threshold 1.01` (nothing escalates), which
  still reports each request's risk.

Accuracy (the suite's exact-match scoring) of all-central, edge-alone and edge-with-escalation at
the calibrated rate comes from the servers' answers. The quality-vs-escalation-rate curve sweeps
the threshold over the edge's reported risks, answering escalated prompts with the central
server's answer and the rest with the edge's own (what the edge serves at that threshold: the
measured run checks it); PGR(rate) = (acc - edge alone) / (all central - edge alone) and APGR is
its mean over rates 0..1 (RouteLLM), against random escalation's (~0.5). Writes
benchmarks/results/edge_central_<library>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_server import ServerProcess  # noqa: E402

from loraswitch.constants import library_dir  # noqa: E402
from loraswitch.demo.suites import suite_for  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DEFAULT_EDGE = {"demo": ["add", "iso_date", "sentiment", "sort_numbers"]}
MARK = "edge-central"
RATES = (0, .1, .2, .3, .4, .5, .55, .6, .8, 1)


class Server(ServerProcess):
    """`loraswitch serve ARGS` (batch 32, long timeouts), started and ready, its log kept in
    `log_dir/<name>.log`."""

    def __init__(self, name: str, args: list[str], log_dir: Path):
        self.name = name
        super().__init__(["--log-level", "warning", "--max-batch", "32", "--max-queue", "4096", "--timeout", "3600", *args],
                         log=log_dir / f"{name}.log")
        try:
            self.wait_ready()
        except (RuntimeError, TimeoutError):
            self.stop()
            raise

    def ask_all(self, prompts: list[str], max_tokens: int, model: str = "auto") -> list[dict]:
        """Every prompt at once (the server batches them), answers in order."""
        def one(prompt: str) -> dict:
            body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                    "temperature": 0}
            r = httpx.post(self.url + "/v1/chat/completions", json=body, timeout=3600)
            r.raise_for_status()
            return r.json()
        with ThreadPoolExecutor(64) as pool:
            return list(pool.map(one, prompts))

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics").text


def accuracy(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


def curve(risks: list[float], local: list[bool], central: list[bool], steps: int = 100) -> list[dict]:
    """Accuracy when the `k` riskiest prompts escalate, at escalation rates 0, 1/steps, ..., 1."""
    order = sorted(range(len(risks)), key=lambda i: -risks[i])
    n, out = len(risks), []
    for s in range(steps + 1):
        k = round(s / steps * n)
        up = set(order[:k])
        out.append({"rate": s / steps, "accuracy": accuracy([central[i] if i in up else local[i] for i in range(n)])})
    return out


def apgr(points: list[dict], low: float, high: float) -> float:
    """RouteLLM's APGR: the mean over escalation rates of (acc - edge alone) / (central - edge alone)."""
    gap = high - low
    return sum((p["accuracy"] - low) / gap for p in points) / len(points) if gap > 0 else float("nan")


def plot(curves: dict[str, list[dict]], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (name, points), style in zip(curves.items(), ("-", "--", "-.")):
        ax.plot([100 * p["rate"] for p in points], [100 * p["accuracy"] for p in points], ls=style,
                label=f"risk {name} (APGR {summary['apgr_variants'][name]:.3f})")
    lo, hi = 100 * summary["edge_alone"], 100 * summary["all_central"]
    ax.plot([0, 100], [lo, hi], ls=":", color="grey", label="random escalation")
    ax.axhline(hi, color="green", ls="--", lw=0.8, label="all central")
    ax.axhline(0.95 * hi, color="green", ls=":", lw=0.8, label="95% of all central")
    m = summary["measured"]
    ax.scatter([100 * m["escalation_rate"]], [100 * m["accuracy"]], color="red", zorder=3,
               label=f"measured, calibrated for {100 * summary['target_rate']:.0f}%")
    ax.set_xlabel("requests escalated to the central server (%)")
    ax.set_ylabel("exact match (%)")
    ax.set_title(f"edge ({summary['edge_adapters']} of {summary['library_adapters']} adapters) -> central, "
                 f"{summary['library']}: APGR {summary['apgr']:.3f}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def edge_dir(adapters: Path, names: list[str], where: Path) -> Path:
    """A folder holding only the edge's adapters (links to the library's)."""
    for name in names:
        (where / name).symlink_to(adapters / name, target_is_directory=True)
    return where


def measure(args) -> dict:
    suite = suite_for(args.library)
    tasks = list(suite.task_names)
    lib = library_dir(args.library)
    held = args.edge_adapters or DEFAULT_EDGE.get(args.library) or tasks[::2]
    test = [c for t in tasks for c in suite.examples(t, "test", args.per_task)]
    val = [c for t in tasks for c in suite.examples(t, "val", args.calibration_per_task)]
    work = Path(tempfile.mkdtemp(prefix="edge_central_"))
    calib = work / "calibration.jsonl"
    calib.write_text("".join(json.dumps({"prompt": c.prompt}) + "\n" for c in val))
    (work / "edge_adapters").mkdir()
    edge_args = ["--adapter-dir", str(edge_dir(lib / "adapters", held, work / "edge_adapters")), "--router-dir",
                 str(lib / "routers")]
    began = time.monotonic()
    central = Server("central", ["--library", args.library], work)
    servers = [central]
    try:
        up = ["--upstream", central.url, "--upstream-model", "auto", "--upstream-timeout", "600"]
        alone = Server("edge_local", [*edge_args, *up, "--escalate-threshold", "1.01"], work)
        servers.append(alone)
        edge = Server("edge", [*edge_args, *up, "--escalate-rate", str(args.rate), "--calibration", str(calib)], work)
        servers.append(edge)
        prompts = [c.prompt for c in test]
        central_out = central.ask_all(prompts, args.max_tokens)
        local_out = alone.ask_all(prompts, args.max_tokens)
        edge_out = edge.ask_all(prompts, args.max_tokens)
        edge_metrics = edge.metrics()
    finally:
        for s in servers:
            s.stop()
    text = lambda out: out["choices"][0]["message"]["content"]  # noqa: E731
    ok = lambda outs: [suite.score(c, text(o)) for c, o in zip(test, outs)]  # noqa: E731
    c_ok, l_ok, e_ok = ok(central_out), ok(local_out), ok(edge_out)
    verdicts = [o["routing"]["escalation"] for o in local_out]
    up_flags = [o["routing"]["target"] == "upstream" for o in edge_out]
    same = [text(e) == text(c if u else lo) for e, c, lo, u in zip(edge_out, central_out, local_out, up_flags)]
    absent = [c.task not in held for c in test]
    summary = {
        "library": args.library, "library_adapters": len(tasks), "edge_adapters": len(held), "edge_holds": held,
        "test_prompts": len(test), "per_task": args.per_task, "calibration_prompts": len(val), "target_rate": args.rate,
        "threshold": edge_out[0]["routing"]["escalation"]["threshold"], "max_tokens": args.max_tokens,
        "all_central": accuracy(c_ok), "edge_alone": accuracy(l_ok),
        "measured": {"accuracy": accuracy(e_ok), "escalation_rate": accuracy(up_flags),
                     "share_of_central": accuracy(e_ok) / accuracy(c_ok),
                     "escalated_absent_tasks": sum(u for u, a in zip(up_flags, absent) if a) / max(1, sum(absent)),
                     "escalated_held_tasks": sum(u for u, a in zip(up_flags, absent) if not a) / max(1, len(absent) - sum(absent)),
                     "answers_as_predicted": accuracy(same),
                     "upstream_latency_s_mean": _mean([o["routing"]["upstream"]["latency_s"] for o in edge_out
                                                       if o["routing"]["target"] == "upstream"]),
                     "fallbacks": sum("fallback" in (o["routing"].get("escalation") or {}) for o in edge_out)},
        "tasks": {t: {"held_by_edge": t in held,
                         **{k: accuracy([f for c, f in zip(test, flags) if c.task == t])
                            for k, flags in (("central", c_ok), ("edge_alone", l_ok), ("edge_escalating", e_ok),
                                             ("escalated", up_flags))}} for t in tasks},
        "metrics_lines": [ln for ln in edge_metrics.splitlines() if ln.startswith(("loraswitch_escalation",
                                                                                  "loraswitch_upstream_latency_seconds_count",
                                                                                  "loraswitch_upstream_latency_seconds_sum"))],
        "seconds": round(time.monotonic() - began, 1),
    }
    records = [{"task": c.task, "central_ok": co, "edge_alone_ok": lo, "edge_ok": eo, "escalated": u,
                **{k: v[k] for k in ("risk", "local", "adapter", "confidence", "p_missing", "base_uncertainty")}}
               for c, co, lo, eo, u, v in zip(test, c_ok, l_ok, e_ok, up_flags, verdicts)]
    return {"summary": summary, "prompts": records}


VARIANTS = {  # the risk of a prompt's local answer, from its recorded verdict
    "as served": lambda r: r["risk"],
    # a router that knows only the edge's tasks can be unsure of them but cannot say "this is a
    # task I lack": 1 - confidence for an adapter, the base's uncertainty alone for an abstention
    "without p_missing": lambda r: 1 - r["confidence"] if r["local"] == "adapter" else r["base_uncertainty"],
    # p_missing and u averaged instead of combined by noisy-OR (which saturates at p_missing = 1
    # and so cannot order the absent tasks' prompts by how unsure the base is)
    "mean of p_missing and u": lambda r: (1 - r["confidence"] if r["local"] == "adapter"
                                          else (r["p_missing"] + r["base_uncertainty"]) / 2),
}


def analyse(result: dict) -> dict:
    """The curves and APGRs of every risk variant, from the per-prompt records."""
    recs, s = result["prompts"], result["summary"]
    local, central = [r["edge_alone_ok"] for r in recs], [r["central_ok"] for r in recs]
    result["curves"] = {name: curve([f(r) for r in recs], local, central) for name, f in VARIANTS.items()}
    s["apgr_variants"] = {name: apgr(c, s["edge_alone"], s["all_central"]) for name, c in result["curves"].items()}
    s["apgr"] = s["apgr_variants"]["as served"]
    result["curve"] = result["curves"]["as served"]
    return result


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def at_rate(points: list[dict], rate: float) -> float:
    return min(points, key=lambda p: abs(p["rate"] - rate))["accuracy"]


def markdown(result: dict, command: str) -> str:
    s = result["summary"]
    m = s["measured"]
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    lines = [f"`{command}` — {s['library']} library, {s['test_prompts']} test prompts ({s['per_task']} per task), "
             f"edge holds {s['edge_adapters']} of {s['library_adapters']} adapters ({', '.join(s['edge_holds'])}); "
             f"threshold {s['threshold']:.4f} calibrated on {s['calibration_prompts']} validation prompts for "
             f"{pct(s['target_rate'])} escalation; greedy, max_tokens {s['max_tokens']}.", "",
             "| setup | escalated | exact match | share of all-central |", "|---|---|---|---|",
             f"| all central ({s['library_adapters']} adapters) | 100% | {pct(s['all_central'])} | 100% |",
             f"| edge alone (no upstream) | 0% | {pct(s['edge_alone'])} | {pct(s['edge_alone'] / s['all_central'])} |",
             f"| **edge with escalation** (measured) | **{pct(m['escalation_rate'])}** | **{pct(m['accuracy'])}** | "
             f"**{pct(m['share_of_central'])}** |", "",
             f"APGR (mean performance gap recovered over escalation rates 0-100%): **{s['apgr']:.3f}** (random "
             f"escalation: 0.5). The same sweep with other risks (from the recorded verdicts): "
             + "; ".join(f"{name}: {a:.3f}" for name, a in s["apgr_variants"].items() if name != "as served")
             + f". Escalated: {pct(m['escalated_absent_tasks'])} of prompts of the tasks the edge lacks, "
             f"{pct(m['escalated_held_tasks'])} of those it holds. Answers identical to what the sweep predicts "
             f"(central's for escalated prompts, the local edge's for the rest): {pct(m['answers_as_predicted'])}; "
             f"fallbacks: {m['fallbacks']}; mean upstream latency {m['upstream_latency_s_mean']} s (loaded, "
             "2 shared CPU cores).", "",
             "| escalation rate | " + " | ".join(f"{100 * r:.0f}%" for r in RATES) + " |",
             "|---|" + "---|" * 10,
             *[f"| exact match, risk {name} | " + " | ".join(pct(at_rate(c, r)) for r in RATES) + " |"
               for name, c in result["curves"].items()],
             "", "| task | on edge | central | edge alone | edge escalating | escalated |", "|---|---|---|---|---|---|"]
    for t, row in s["tasks"].items():
        lines.append(f"| `{t}` | {'yes' if row['held_by_edge'] else 'no'} | {pct(row['central'])} | "
                     f"{pct(row['edge_alone'])} | {pct(row['edge_escalating'])} | {pct(row['escalated'])} |")
    return "\n".join(lines)


def write_doc(doc: Path, block: str, library: str) -> None:
    start, end = f"<!-- generated:{MARK}-{library}:start -->", f"<!-- generated:{MARK}-{library}:end -->"
    text = doc.read_text()
    if start not in text:
        raise SystemExit(f"{doc} has no {start} ... {end} block")
    head, rest = text.split(start, 1)
    doc.write_text(head + start + "\n" + block + "\n" + end + rest.split(end, 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", default="demo")
    ap.add_argument("--per-task", type=int, default=40, help="test prompts per task")
    ap.add_argument("--calibration-per-task", type=int, default=20, help="validation prompts per task (calibration)")
    ap.add_argument("--rate", type=float, default=0.5, help="target escalation rate the edge is calibrated for")
    ap.add_argument("--edge-adapters", nargs="*", help="adapters the edge holds (default: half the library)")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--doc", type=Path, help="also rewrite this doc's generated block")
    ap.add_argument("--render", action="store_true", help="only redo the analysis and outputs from the saved JSON")
    args = ap.parse_args()
    stem = RESULTS / f"edge_central_{args.library}"
    result = analyse(json.loads(stem.with_suffix(".json").read_text()) if args.render else measure(args))
    RESULTS.mkdir(exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result["curves"], result["summary"], stem.with_suffix(".png"))
    command = "python benchmarks/edge_central.py" + ("" if args.library == "demo" else f" --library {args.library}") + \
        ("" if args.per_task == 40 else f" --per-task {args.per_task}") + ("" if args.rate == 0.5 else f" --rate {args.rate}") + \
        ("" if args.calibration_per_task == 20 else f" --calibration-per-task {args.calibration_per_task}") + \
        (f" --edge-adapters {' '.join(args.edge_adapters)}" if args.edge_adapters else "")
    block = markdown(result, command) + f"\n\n![quality vs escalation rate](../benchmarks/results/{stem.name}.png)"
    stem.with_suffix(".md").write_text(block + "\n")
    print(block)
    if args.doc:
        write_doc(args.doc, block, args.library)


if __name__ == "__main__":
    main()
