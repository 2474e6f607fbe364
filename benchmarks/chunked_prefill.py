"""How long a prompt that joins a running batch stalls its decoding rows (continuous batching with
chunked prefill, issue 17 item 4).

A batch of `--rows` short chat requests decodes (greedy, no stop tokens, adapters named, one per
row over the demo adapters); after `--join-after` steps one request with a long prompt
(`--long-tokens` positions) joins it through `generate`'s `admit`. Each configuration prefills it
in chunks of `--chunks` positions per decode step (`one-shot`: the whole prompt between two
steps). Reported per configuration, medians over `--repeats` rounds run round-robin after a
warm-up: the running rows' longest gap between two tokens (the stall), their median gap, the
joined row's time to first token from its admission, and the running rows' tokens/s.

    python benchmarks/chunked_prefill.py --repeats 3

Writes benchmarks/results/chunked_prefill.json and .md.

`--first-batch`: the other case, a long prompt that *starts* a batch (nothing decoding yet) and a
short request arriving `--arrive-s` seconds into its prefill. A first batch longer than a chunk is
read chunk by chunk like a joining group, so the short one is admitted after the chunk under way
and answers before the long one; `one-shot` is the batch read in one forward, which the short
request waits for whole. Reported: each one's time to first token from its arrival (the long
one's from the start), and the wall time of the round. Writes chunked_prefill_first.json and .md.

    python benchmarks/chunked_prefill.py --first-batch --chunks 64,256,one-shot --repeats 3 --max-tokens 16

`--doc docs/benchmarks.md` rewrites the doc's block of either case.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def one_run(switch, short: list[list[int]], long: list[int], names: list[str], args, chunk: int | None) -> dict:
    from loraswitch.generate import Joining, Listener, SamplingParams, explicit, generate

    engine = switch.engine
    marks: dict[int, list[float]] = {}
    admitted: list[float] = []
    calls = [0]

    class Marks(Listener):
        def token(self, row, gen):
            marks.setdefault(row, []).append(time.perf_counter())

    def admit(held: int):
        calls[0] += 1
        if calls[0] != args.join_after:
            return None
        admitted.append(time.perf_counter())
        return Joining([long], explicit(engine, [names[0]]), 4)

    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=0, stop_ids=set())
    t0 = time.perf_counter()
    generate(engine, short, explicit(engine, names[: len(short)]), params, Marks(), admit=admit,
             prefill_chunk=chunk or 1 << 30)
    wall = time.perf_counter() - t0
    gaps = [b - a for row in range(len(short)) for a, b in zip(marks[row], marks[row][1:])]
    joined = marks.get(len(short), [])
    return {"max_gap_s": max(gaps), "median_gap_s": median(gaps),
            "joined_ttft_s": joined[0] - admitted[0] if joined and admitted else None,
            "running_tok_s": sum(len(marks[r]) for r in range(len(short))) / wall}


def first_run(switch, short: list[int], long: list[int], names: list[str], args, chunk: int | None) -> dict:
    """A long prompt starting a batch alone; `short` arrives `args.arrive_s` seconds later."""
    from loraswitch.generate import Joining, Listener, SamplingParams, explicit, generate

    engine = switch.engine
    marks: dict[int, list[float]] = {}
    t0 = time.perf_counter()
    arrival = t0 + args.arrive_s
    handed = []

    class Marks(Listener):
        def token(self, row, gen):
            marks.setdefault(row, []).append(time.perf_counter())

    def admit(held: int):
        if handed or time.perf_counter() < arrival:
            return None
        handed.append(time.perf_counter())
        return Joining([short], explicit(engine, [names[1]]), args.max_tokens)

    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=0, stop_ids=set())
    generate(engine, [long], explicit(engine, [names[0]]), params, Marks(), admit=admit, prefill_chunk=chunk or 1 << 30)
    wall = time.perf_counter() - t0
    return {"short_ttft_s": marks[1][0] - arrival if 1 in marks else None, "long_ttft_s": marks[0][0] - t0,
            "short_first": bool(1 in marks and marks[1][0] < marks[0][0]), "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--long-tokens", type=int, default=1024)
    p.add_argument("--join-after", type=int, default=8)
    p.add_argument("--chunks", default="32,64,128,256,one-shot")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--first-batch", action="store_true", help="a long first prompt and a short arrival (module doc)")
    p.add_argument("--arrive-s", type=float, default=0.3)
    p.add_argument("--doc", help="also rewrite the results block in this markdown file (docs/benchmarks.md)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from loraswitch.demo.tasks import TASK_NAMES, examples
    from loraswitch.switch import Switch
    from loraswitch.switch.request import Request

    switch = Switch()
    switch.engine.prefix_tokens = 0  # every run prefills the same prompts in full
    names = ([t for t in TASK_NAMES if t in switch.engine.slots] * args.rows)[: args.rows]  # the demo adapters
    short = [list(Request.chat(examples(t, "test", 1, seed=i)[0].prompt).tokenized(switch.base).prompt_ids)
             for i, t in enumerate(names)]
    filler = " ".join(examples(TASK_NAMES[0], "test", 64, seed=1)[i % 64].prompt for i in range(400))
    long = list(Request.chat(filler).tokenized(switch.base).prompt_ids)[-args.long_tokens:]
    configs = [None if c == "one-shot" else int(c) for c in args.chunks.split(",")]
    label = {c: "one-shot" if c is None else str(c) for c in configs}
    runs: dict[str, list[dict]] = {label[c]: [] for c in configs}
    run = (lambda c: first_run(switch, short[0], long, names, args, c)) if args.first_batch else (
        lambda c: one_run(switch, short, long, names, args, c))
    for c in configs:  # warm-up
        run(c)
    for k in range(args.repeats):
        for c in configs[k % len(configs):] + configs[: k % len(configs)]:
            runs[label[c]].append(run(c))
            print(label[c], json.dumps(runs[label[c]][-1]), flush=True)
    summary = {name: {key: round(median(r[key] for r in rs), 4) if key != "short_first" else all(r[key] for r in rs)
                      for key in rs[0]} for name, rs in runs.items()}
    report = {"finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
              "load": [round(x, 2) for x in os.getloadavg()], "config": vars(args),
              "long_prompt_tokens": len(long), "argv": sys.argv[1:] if argv is None else argv,
              "summary": summary, "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "chunked_prefill_first" if args.first_batch else "chunked_prefill"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    md = markdown_first(report) if args.first_batch else markdown(report)
    (RESULTS / f"{stem}.md").write_text(md)
    if args.doc:
        from loraswitch.eval.report import update_doc

        update_doc(Path(args.doc), "chunked-prefill-first" if args.first_batch else "chunked-prefill", md)
    print(md)
    return 0


def markdown(report: dict) -> str:
    cfg = report["config"]
    return _table(report, f"A long prompt joining a running batch ({report['finished_at']})",
                  f"{cfg['rows']} rows decoding {cfg['max_tokens']} tokens each (greedy, no stop, one demo adapter per "
                  f"row); after {cfg['join_after']} steps a {report['long_prompt_tokens']}-token prompt joins.",
                  ["prefill chunk", "running rows' longest gap s", "median gap s", "joined row's first token s",
                   "running rows tok/s"],
                  [[name, s["max_gap_s"], s["median_gap_s"], s["joined_ttft_s"], s["running_tok_s"]]
                   for name, s in report["summary"].items()])


def markdown_first(report: dict) -> str:
    cfg = report["config"]
    return _table(report, f"A short request arriving during a long first prefill ({report['finished_at']})",
                  f"A {report['long_prompt_tokens']}-token prompt starts a batch alone; {cfg['arrive_s']} s later a "
                  f"short chat request arrives (greedy, {cfg['max_tokens']} tokens each, no stop, a demo adapter each).",
                  ["first batch read", "short request's first token s (from its arrival)", "long prompt's first token s",
                   "short answered first", "round wall s"],
                  [["in one forward" if name == "one-shot" else f"in chunks of {name}", s["short_ttft_s"],
                    s["long_ttft_s"], s["short_first"], s["wall_s"]] for name, s in report["summary"].items()])


def _table(report: dict, title: str, setup: str, header: list[str], rows: list[list]) -> str:
    cfg = report["config"]
    lines = [f"# {title}", "", f"{setup} Medians of {cfg['repeats']} round-robin runs, {cfg['threads']} torch "
             f"thread(s), load average {report['load']} ({report['machine']}).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    lines += ["", "Reproduce: `python benchmarks/chunked_prefill.py " + " ".join(report["argv"]) + "`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
