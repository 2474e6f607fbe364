"""Scoring and aggregation, kept free of models so they can be checked on hand-made answers.

What a method returns per item is the library's one answer type, a `generate.Generation`
(text, token ids, per-token trace, routing summary). `score_item` turns (item, answer) into a flat record;
`aggregate` turns one method's records into the numbers of the report.

Which adapter "answered": the majority, over generated tokens, of each token's top adapter in the
trace ("base" for a token routed to no adapter). Without a trace, the routing summary's
`adapter` decides. A method abstains on a prompt when that answer is "base". For composite
prompts the same rule is applied per part: to the tokens the trace labels with that part, or,
when the trace has no part labels (token-level routers), to the tokens of the answer's N-th line.
"""

from __future__ import annotations

from collections import Counter

from loraswitch.eval.data import OOS_SET, TASK_SET, Item
from loraswitch.eval.suite import Suite
from loraswitch.generate import Generation

BASE = "base"


def top_adapter(entry: dict) -> str:
    adapters = {k: v for k, v in (entry.get("adapters") or {}).items() if v > 0}
    return max(adapters, key=adapters.get) if adapters else BASE


def _majority(names: list[str]) -> str:
    counts = Counter(names)
    best = max(counts.values())
    return next(n for n in names if counts[n] == best)  # ties: the one seen first


def _summary_adapter(routing: dict, part: int | None = None) -> str:
    chosen = routing.get("adapter")
    if isinstance(chosen, list):
        chosen = chosen[part] if part is not None and part < len(chosen) else (chosen[0] if chosen else None)
    return chosen or BASE


def chosen_adapter(answer: Generation) -> str:
    """The adapter that answered (majority over tokens), "base" when the method abstained."""
    if answer.trace:
        return _majority([top_adapter(e) for e in answer.trace])
    return _summary_adapter(answer.routing)


def part_adapters(answer: Generation, n_parts: int) -> list[str]:
    """The adapter that answered each part of a composite prompt."""
    groups: dict[int, list[str]] = {}
    if any("part" in e for e in answer.trace):
        for e in answer.trace:
            groups.setdefault(int(e.get("part", 1)) - 1, []).append(top_adapter(e))
    else:
        line = 0
        for e in answer.trace:
            groups.setdefault(line, []).append(top_adapter(e))
            line += str(e.get("token", "")).count("\n")
    out = []
    for i in range(n_parts):
        out.append(_majority(groups[i]) if groups.get(i) else _summary_adapter(answer.routing, i))
    return out


def score_item(item: Item, answer: Generation, routes: bool, suite: Suite) -> dict:
    """One flat, JSON-ready record, scored by `suite`'s metric. `routes`: whether the method
    routes (router metrics apply)."""
    rec: dict = {"id": item.id, "set": item.set, "task": item.task, "output": answer.text, "n_tokens": len(answer.token_ids)}
    if item.set == TASK_SET:
        rec["correct"] = bool(suite.score(item.case, answer.text))
        rec["split"] = int(answer.routing.get("fan_out", 1)) > 1  # a single-task prompt answered in parts
        rec["heldout_template"] = item.heldout_template
        rec["seen_payload"] = item.seen_payload
    elif item.is_composite:
        got = suite.parse_parts(answer.text, len(item.parts))
        rec["parts"] = [{"task": p.task, "output": g, "correct": bool(suite.score(p, g))} for p, g in zip(item.parts, got)]
        rec["correct"] = all(p["correct"] for p in rec["parts"])
    if routes:
        chosen = chosen_adapter(answer)
        rec["chosen"] = chosen
        rec["abstained"] = chosen == BASE
        if item.is_composite:
            for part, name in zip(rec["parts"], part_adapters(answer, len(item.parts))):
                part["chosen"] = name
    return rec


def _rate(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def aggregate(records: list[dict], tasks: list[str], routes: bool) -> dict:
    """Accuracy per task and overall; held-out vs training wording; num_to_french on unseen
    numbers; composite per-part accuracy; for routers, routing accuracy, confusion and abstain."""
    single = [r for r in records if r["set"] == TASK_SET]
    out: dict = {
        "accuracy": {
            "overall": _rate([r["correct"] for r in single]),
            "n": len(single),
            "per_task": {t: _rate([r["correct"] for r in single if r["task"] == t]) for t in tasks},
        },
        "accuracy_heldout_wording": _rate([r["correct"] for r in single if r.get("heldout_template")]),
        "accuracy_training_wording": _rate([r["correct"] for r in single if r.get("heldout_template") is False]),
    }
    fr = [r for r in single if r["task"] == "num_to_french"]
    if fr:
        out["num_to_french"] = {
            "unseen_numbers": _rate([r["correct"] for r in fr if not r.get("seen_payload")]),
            "seen_numbers_new_wording": _rate([r["correct"] for r in fr if r.get("seen_payload")]),
            "n_unseen": sum(1 for r in fr if not r.get("seen_payload")),
        }
    comp: dict = {}
    for r in records:
        if "parts" in r:
            comp.setdefault(r["set"], []).append(r)
    out["composite"] = {}
    for name in sorted(comp, key=lambda s: (s.split("-")[0], int(s.split("-")[1]), s)):
        rs = comp[name]
        parts = [p for r in rs for p in r["parts"]]
        entry = {"n_prompts": len(rs), "part_accuracy": _rate([p["correct"] for p in parts]),
                 "all_parts_accuracy": _rate([r["correct"] for r in rs])}
        if routes:
            entry["part_routing_accuracy"] = _rate([p.get("chosen") == p["task"] for p in parts])
        out["composite"][name] = entry
    for group in ("train", "heldout"):  # free-form composites (issue 13), all sizes together
        parts = [p for name, rs in comp.items() if name.startswith("freeform-") and name.endswith(group)
                 for r in rs for p in r["parts"]]
        if parts:
            out.setdefault("freeform", {})[group] = {"n_parts": len(parts),
                                                     "part_accuracy": _rate([p["correct"] for p in parts])}
    if routes:
        out["routing_accuracy"] = {
            "overall": _rate([r["chosen"] == r["task"] for r in single]),
            "heldout_wording": _rate([r["chosen"] == r["task"] for r in single if r.get("heldout_template")]),
            "per_task": {t: _rate([r["chosen"] == r["task"] for r in single if r["task"] == t]) for t in tasks},
        }
        out["false_abstain_rate"] = _rate([r["abstained"] for r in single])
        out["false_split_rate"] = _rate([r.get("split", False) for r in single])
        oos = [r for r in records if r["set"] == OOS_SET]
        out["abstain_rate"] = _rate([r["abstained"] for r in oos])
        out["n_oos"] = len(oos)
        confusion: dict[str, dict[str, int]] = {}
        for r in single + oos:
            row = confusion.setdefault(r["task"] or "out-of-suite", {})
            row[r["chosen"]] = row.get(r["chosen"], 0) + 1
        out["confusion"] = confusion
    return out


# issue 3's bar for a router, each as (label, goal); ratios are against the oracle adapter
ROUTING_GOALS = {
    "routing_accuracy": ("routing accuracy, held-out single-task prompts", 0.98),
    "routing_accuracy_heldout_wording": ("routing accuracy, wording never used in training", 0.90),
    "min_task_accuracy_vs_oracle": ("worst task's accuracy / the oracle's", 0.97),
    "composite-3_vs_oracle": ("composite-3 per-part accuracy / the oracle's", 0.90),
    "composite-5_vs_oracle": ("composite-5 per-part accuracy / the oracle's", 0.90),
    "composite-10_vs_oracle": ("composite-10 per-part accuracy / the oracle's", 0.90),
    "abstain_rate": ("out-of-suite prompts answered by the base model", 0.90),
    "freeform-train_vs_oracle": ("free-form composites, tuned-on layouts: per-part accuracy / the oracle's", 0.90),
    "freeform-heldout_vs_oracle": ("free-form composites, held-out layouts: per-part accuracy / the oracle's", 0.90),
}


def _over(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return round(a / b, 4) if b > 0 else (1.0 if a >= b else None)


def routing_targets(methods: dict[str, dict]) -> dict[str, dict]:
    """For every routing method, the measured value of each ROUTING_GOALS entry and whether it
    meets the goal (None where this run did not measure it, e.g. no oracle or no composite-5)."""
    oracle = methods.get("oracle", {})
    out: dict[str, dict] = {}
    for name, r in methods.items():
        if r.get("status") != "ok" or not r.get("routes"):
            continue
        per_task = r["accuracy"]["per_task"]
        ratios = [_over(per_task.get(t), oracle.get("accuracy", {}).get("per_task", {}).get(t)) for t in per_task]
        ratios = [x for x in ratios if x is not None]
        values = {
            "routing_accuracy": r["routing_accuracy"]["overall"],
            "routing_accuracy_heldout_wording": r["routing_accuracy"].get("heldout_wording"),
            "min_task_accuracy_vs_oracle": min(ratios) if ratios else None,
            "abstain_rate": r.get("abstain_rate"),
        }
        for size in ("composite-3", "composite-5", "composite-10"):
            ours = r.get("composite", {}).get(size, {}).get("part_accuracy")
            ref = oracle.get("composite", {}).get(size, {}).get("part_accuracy")
            values[f"{size}_vs_oracle"] = _over(ours, ref)
        for group in ("train", "heldout"):
            ours = r.get("freeform", {}).get(group, {}).get("part_accuracy")
            ref = oracle.get("freeform", {}).get(group, {}).get("part_accuracy")
            values[f"freeform-{group}_vs_oracle"] = _over(ours, ref)
        out[name] = {k: {"value": v, "goal": ROUTING_GOALS[k][1], "met": None if v is None else v >= ROUTING_GOALS[k][1]}
                     for k, v in values.items()}
    return out
