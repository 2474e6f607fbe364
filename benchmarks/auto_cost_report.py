"""The markdown of `auto_cost.py`'s results: end-to-end cost of `auto`, the served path's profile,
and served throughput against the engine's (kept apart so the measuring script stays short)."""

from __future__ import annotations

PHASES = ("segment", "template", "route", "prefill", "decode", "listener", "other")


def _f(x, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _ratio(r: dict | None) -> str:
    if not r:
        return "-"
    return f"{r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}]"


def _runs(report: dict):
    """(mode, concurrency, result) of every measured setting, the library's before the server's."""
    for mode in ("library", "server"):
        for n, res in report.get(mode, {}).items():
            yield mode, n, res


def _end_to_end(report: dict) -> list[str]:
    lines = ["| where | concurrency | load | config | completion tok/s (spread) | TTFT s | per-request tok/s | "
             "wall s | auto / named (tok/s) | auto / named (TTFT) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, n, res in _runs(report):
        ratios = res["ratios"].get("auto/named", {})
        for c, s in res["configs"].items():
            if c == "engine_forced":  # its forced tokens are not the same work
                continue
            first = c == "auto"
            lines.append(f"| {mode} | {n} | {res['load'][0]} | {c} | {_f(s.get('tok_s'))} ({_f(s.get('tok_s_spread'))}) | "
                         f"{_f(s.get('ttft_s'), 3)} | {_f(s.get('req_tok_s'))} | {_f(s.get('wall_s'))} | "
                         f"{_ratio(ratios.get('tok_s')) if first else ''} | {_ratio(ratios.get('ttft_s')) if first else ''} |")
    return lines


def _selector_share(report: dict) -> list[str]:
    lines = ["| where | concurrency | prefill s | selector (route) s | segmentation s | selector / prefill | "
             "segmentation / prefill | both / prefill |", "|---|---|---|---|---|---|---|---|"]
    for mode, n, res in _runs(report):
        ph = res["configs"]["auto"]["phases"]
        pre = ph.get("prefill") or 0.0
        route, seg = ph.get("route", 0.0), ph.get("segment", 0.0)

        def share(x: float, pre: float = pre) -> str:
            return f"{x / pre:.2f}" if pre else "-"

        lines.append(f"| {mode} | {n} | {_f(pre, 3)} | {_f(route, 3)} | {_f(seg, 3)} | {share(route)} | {share(seg)} | "
                     f"{share(route + seg)} |")
    return lines


def _profile(report: dict) -> list[str]:
    server = report.get("server", {})
    if not server:
        return []
    n = max(server, key=int)
    lines = [f"Served path at concurrency {n} (medians, seconds of one burst of {n} streamed requests; "
             "`outside worker`: wall time the worker was not in a round: HTTP, the event loop, the first request's "
             "wait):", "", "| config | batches | wall | " + " | ".join(PHASES) + " | outside worker |",
             "|---|---|---|" + "---|" * (len(PHASES) + 1)]
    for c, s in server[n]["configs"].items():
        if c.startswith("engine"):  # not served: no worker phases
            continue
        ph, wall = s["phases"], s["wall_s"]
        cells = [f"{ph.get(k, 0.0):.2f} ({ph.get(k, 0.0) / wall:.0%})" for k in (*PHASES, "outside_worker")]
        lines.append(f"| {c} | {s.get('batches', '-')} | {wall:.2f} | " + " | ".join(cells) + " |")
    return lines


def _served_vs_engine(report: dict) -> list[str]:
    lines = ["| where | concurrency | load | named tok/s | engine, same answers tok/s | engine forced decode tok/s | "
             "named / engine same answers | named / engine forced decode |", "|---|---|---|---|---|---|---|---|"]
    for mode, n, res in _runs(report):
        c, r = res["configs"], res["ratios"]
        forced = c.get("engine_forced", {}).get("decode_tok_s")
        lines.append(f"| {mode} | {n} | {res['load'][0]} | {_f(c['named'].get('tok_s'))} | "
                     f"{_f(c.get('engine', {}).get('tok_s'))} | {_f(forced)} | "
                     f"{_ratio(r.get('named/engine', {}).get('tok_s'))} | "
                     f"{_ratio(r.get('named/engine_forced decode', {}).get('tok_s'))} |")
    return lines


def _prompts_note(report: dict) -> str:
    cache = report.get("prefix_cache")
    fresh = "new prompts of the same tasks every round" if report.get("fresh_prompts") else "the same prompts every round"
    if cache is None:  # a report from before the prefix cache
        return f"Prompts: {fresh}."
    return f"Prompts: {fresh}; prefix cache {'off' if not cache else f'{cache} positions'}."


def _tokens_note(report: dict) -> str:
    if "--ignore-eos" in report.get("argv", []):
        return (f"Completion tokens/s counts the answers' tokens (`ignore_eos`: every answer is {report['max_tokens']} "
                "tokens, so every configuration does the same work)")
    return ("Completion tokens/s counts the answers' tokens (answers stop at the end-of-turn token, so `base`, "
            "which writes longer answers, is not the same work)")


def markdown(report: dict) -> str:
    lines = [f"# What `auto` costs end to end ({report['finished_at']})", "",
             f"Demo prompts, request i asks task i mod 8; greedy, max_tokens {report['max_tokens']}; "
             f"{report['repeats']} rounds round-robin after a warm-up, medians, spread = (max - min) / median, "
             f"ratios paired within a round (median [min-max]). {report['machine']}; load average "
             f"{report['load_start']} at the start, {report['load_end']} at the end (the machine is shared). "
             f"{_prompts_note(report)}", "",
             "## auto vs named adapter vs base", "", *_end_to_end(report), "",
             _tokens_note(report) + "; `engine`: `generate` alone over the same chat-templated prompts with the "
             "adapters named (the same answers as `named`).", "",
             "## The selector's share of prefill (auto)", "", *_selector_share(report), "",
             "Segmentation's screen reads the batch's whole prompts for the selector's fast head in its own pass "
             "(`features.read_ahead`), so that pass counts in `segmentation`; `route` is what is left (the main "
             "head's reading of the prompts the fast head sends to no adapter).", "",
             "## Where the served time goes", "", *_profile(report), "",
             "## Served throughput vs the engine", "", *_served_vs_engine(report), "",
             "`engine, same answers`: `generate` alone over the same prompts, writing the same tokens as the "
             "`named` answers (prefill included), in the same rounds; `engine forced decode`: every row forced to "
             "max_tokens, decode steps only (bench.py's quantity: it leaves out the prefill, and the demo's short "
             "answers give the served number fewer tokens per prompt to spread it over).",
             "", "Reproduce: `python benchmarks/auto_cost.py " + " ".join(report["argv"]) + "`", ""]
    if report.get("cprofile"):
        lines += ["<details><summary>cProfile of one library round of auto</summary>", "", "```",
                  report["cprofile"].strip(), "```", "</details>", ""]
    return "\n".join(lines)
