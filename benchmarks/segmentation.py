#!/usr/bin/env python
"""Issue 13: does `auto` find the parts of a free-form prompt, and leave single-task prompts whole?

    python benchmarks/segmentation.py                       # defaults below, ~15 min on 2 busy cores
    python benchmarks/segmentation.py --singles 20 --layout-prompts 2 --eval-limit 2 --freeform 1

Three measurements on the demo library, written to benchmarks/results/segmentation.json:

1. false splits: every single-task test prompt asked (`--singles` per task) is segmented; the
   rate is the share cut into two parts or more (segmentation only: no generation needed);
2. parts found per layout: free-form composites (`demo.tasks.freeform`, 2, 3 and 5 parts,
   `--layout-prompts` per layout and size) segmented; a prompt counts when exactly its parts are
   found with the right adapter for each; training and held-out layouts apart;
3. the eval: `auto` vs `oracle` per-part accuracy on free-form composites (`--freeform` per
   layout and size) and on single-task prompts (`--eval-limit` per task), answered and scored
   by `loraswitch eval`.

With `--library bigbench` (needs `loraswitch data bigbench`), the same on data nobody here wrote,
written to benchmarks/results/segmentation_bigbench.json: false splits over the BIG-bench test
prompts (`--singles` per task), and parts found in MeteoRA-format composite-3 / -5 / -10 prompts
(`--layout-prompts` per size; worked examples must be read as context, not as questions), and
false splits over ten more BIG-bench tasks nothing here was trained or tuned on
(`--heldout-singles` per task, fetched from the same sdist into the cache on first use).
Segmentation only (no generation): the answers are scored by `loraswitch eval --library bigbench`.

The settings of `switch.segment` were tuned on training layouts and the validation split only;
no BIG-bench prompt was looked at while tuning them.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import typer

OUT = Path(__file__).resolve().parent / "results"


def _segmentation(singles: int, layout_prompts: int, seed: int, split: str, min_confidence: float) -> dict:
    from loraswitch.demo.tasks import TASK_NAMES, examples
    from loraswitch.demo.tasks.freeform import freeform
    from loraswitch.switch import Switch
    from loraswitch.switch.segment import Settings, segment

    sw = Switch()
    router = sw.router("auto")
    cases = [e for t in TASK_NAMES for e in examples(t, split, singles, seed=seed)]
    comps = [c for heldout in (False, True) for n in (2, 3, 5) for c in freeform(n, layout_prompts, heldout, split, seed)]
    settings = Settings(min_confidence=min_confidence)
    t0 = time.perf_counter()
    found = segment(router, sw.engine, [e.prompt for e in cases] + [c.prompt for c in comps], settings)
    seconds = time.perf_counter() - t0
    cut = [(e, f) for e, f in zip(cases, found) if len(f.parts) >= 2]
    layouts: dict[str, dict] = {}
    for c, f in zip(comps, found[len(cases):]):
        # the adapter each found part is answered with: the same selector on the part's own text
        ok = len(f.parts) == len(c.parts)
        entry = layouts.setdefault(c.layout, {"group": "heldout" if c.heldout else "train", "n": 0, "parts_found": 0})
        entry["n"] += 1
        entry["parts_found"] += ok
    texts = [p.text for c, f in zip(comps, found[len(cases):]) if len(f.parts) == len(c.parts) for p in f.parts]
    routed = router.route(sw.engine, texts)
    right: dict[str, list[bool]] = {}
    k = 0
    for c, f in zip(comps, found[len(cases):]):
        if len(f.parts) != len(c.parts):
            right.setdefault(c.layout, []).append(False)
            continue
        right.setdefault(c.layout, []).append(all(d.adapter == p.task for d, p in zip(routed[k : k + len(c.parts)], c.parts)))
        k += len(c.parts)
    for name, entry in layouts.items():
        entry["parts_and_adapters_right"] = sum(right[name])
    groups = {g: {"n": sum(e["n"] for e in layouts.values() if e["group"] == g),
                  "parts_found": sum(e["parts_found"] for e in layouts.values() if e["group"] == g),
                  "parts_and_adapters_right": sum(e["parts_and_adapters_right"] for e in layouts.values()
                                                  if e["group"] == g)} for g in ("train", "heldout")}
    return {"single_task_prompts": len(cases), "false_splits": len(cut),
            "false_split_rate": round(len(cut) / max(1, len(cases)), 4), "parts_pointing_back": _pointing_back(found),
            "parts_chained": _chained(found),
            "false_split_examples": [{"task": e.task, "prompt": e.prompt, "parts": f.texts} for e, f in cut[:10]],
            "layouts": layouts, "groups": groups, "seconds": round(seconds, 1)}


def _pointing_back(found) -> int:
    """Parts answered with the request before them in sight (`Part.answered`, docs/routing.md)."""
    return sum(p.answered != p.text for f in found for p in f.parts if p.answered)


def _chained(found) -> int:
    """Parts answered after the part before them, on its answer (`Part.after`, docs/routing.md)."""
    return sum(p.chained for f in found for p in f.parts)


def _segmentation_bigbench(singles: int, per_size: int, seed: int, heldout: int) -> dict:
    from loraswitch.console import library_paths
    from loraswitch.demo.bigbench.composites import composite_parts
    from loraswitch.demo.bigbench.tasks import TASK_NAMES, examples, heldout_examples
    from loraswitch.switch import Switch
    from loraswitch.switch.segment import segment

    adapters, routers = library_paths("bigbench", None, None)
    sw = Switch(None, adapters, routers)
    router = sw.router("auto")
    cases = [e for t in TASK_NAMES for e in examples(t, "test", singles, seed=seed)]
    comps = [(n, prompt, parts) for n in (3, 5, 10) for prompt, parts in composite_parts(n, per_size, seed)]
    others = heldout_examples(heldout) if heldout else []
    t0 = time.perf_counter()
    found = segment(router, sw.engine, [e.prompt for e in cases] + [c[1] for c in comps] + [e.prompt for e in others])
    seconds = time.perf_counter() - t0
    found, found_others = found[: len(cases) + len(comps)], found[len(cases) + len(comps):]
    other_split = [(e, f) for e, f in zip(others, found_others) if len(f.parts) >= 2]
    split = [(e, f) for e, f in zip(cases, found) if len(f.parts) >= 2]
    per_task = {t: round(sum(1 for e, _ in split if e.task == t) / max(1, sum(e.task == t for e in cases)), 4)
                for t in TASK_NAMES}
    sizes: dict[str, dict] = {}
    for (n, _, parts), f in zip(comps, found[len(cases):]):
        entry = sizes.setdefault(f"composite-{n}", {"n": 0, "parts_found": 0, "parts_and_adapters_right": 0,
                                                    "found_part_counts": []})
        entry["n"] += 1
        entry["found_part_counts"].append(len(f.parts))
        if len(f.parts) == n:
            entry["parts_found"] += 1
            routed = router.route(sw.engine, f.texts)
            entry["parts_and_adapters_right"] += all(d.adapter == p.task for d, p in zip(routed, parts))
    return {"single_task_prompts": len(cases), "false_splits": len(split),
            "false_split_rate": round(len(split) / max(1, len(cases)), 4), "false_split_rate_per_task": per_task,
            "parts_pointing_back": _pointing_back(found + found_others),
            "parts_chained": _chained(found + found_others),
            "false_split_examples": [{"task": e.task, "prompt": e.prompt[:600], "parts": [t[:200] for t in f.texts]}
                                     for e, f in split[:10]],
            "composites": sizes, "seconds": round(seconds, 1),
            "heldout_tasks": {"prompts": len(others), "false_splits": len(other_split),
                              "false_split_rate": round(len(other_split) / max(1, len(others)), 4),
                              "per_task": {t: sum(e.task == t for e, _ in other_split) for t in dict.fromkeys(e.task for e in others)},
                              "examples": [{"task": e.task, "prompt": e.prompt[:600], "parts": [t[:200] for t in f.texts]}
                                           for e, f in other_split[:10]]}}


def main(singles: int = 50, layout_prompts: int = 4, eval_limit: int = 4, freeform: int = 2, seed: int = 0,
         out: Path | None = None, skip_eval: bool = False, library: str = "demo", heldout_singles: int = 20,
         split: str = "test", min_confidence: float | None = None) -> None:
    """`--split val --min-confidence X --skip-eval`: how `switch.segment`'s settings are tuned (on
    the validation split; the test split measures them)."""
    import torch

    from loraswitch.switch.segment import Settings

    if library == "bigbench" and (split != "test" or min_confidence is not None):
        raise typer.BadParameter("--split and --min-confidence apply to the demo library only")
    if split != "test" and out is None:
        raise typer.BadParameter("--split val needs --out (the committed segmentation.json is the test split's)")
    min_confidence = Settings().min_confidence if min_confidence is None else min_confidence
    torch.manual_seed(0)
    if library == "bigbench":
        result = {"settings": {"library": library, "singles_per_task": singles, "composites_per_size": layout_prompts,
                               "seed": seed, "heldout_singles_per_task": heldout_singles},
                  "segmentation": _segmentation_bigbench(singles, layout_prompts, seed, heldout_singles)}
        print(json.dumps({k: v for k, v in result["segmentation"].items() if k != "false_split_examples"}, indent=1))
        out = out or OUT / "segmentation_bigbench.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(out)
        return
    out = out or OUT / "segmentation.json"
    result = {"settings": {"singles_per_task": singles, "layout_prompts": layout_prompts, "eval_limit": eval_limit,
                           "freeform_per_layout": freeform, "seed": seed, "split": split, "min_confidence": min_confidence},
              "segmentation": _segmentation(singles, layout_prompts, seed, split, min_confidence)}
    print(json.dumps({k: v for k, v in result["segmentation"].items() if k != "false_split_examples"}, indent=1))
    if not skip_eval:
        from loraswitch.demo.suites import DemoSuite
        from loraswitch.eval.harness import EvalConfig, run_eval

        suite = DemoSuite()
        with tempfile.TemporaryDirectory(prefix="segmentation-eval-") as scratch:  # its files: only the numbers are kept
            cfg = EvalConfig(suite=suite, methods=["oracle", "auto"], tasks=list(suite.task_names), limit=eval_limit,
                             composite_limit=0, oos_limit=0, freeform_limit=freeform, out_dir=Path(scratch), progress=False,
                             heatmap_prompts=0, seed=seed)
            res = run_eval(cfg)
        m = res["methods"]
        result["eval"] = {name: {"accuracy": r.get("accuracy", {}).get("overall"), "freeform": r.get("freeform"),
                                 "composite": r.get("composite"), "false_split_rate": r.get("false_split_rate"),
                                 "status": r["status"]} for name, r in m.items()}
        result["targets"] = {k: v for k, v in res["routing_targets"].get("auto", {}).items() if k.startswith("freeform")}
        print(json.dumps({"eval": result["eval"], "targets": result["targets"]}, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(out)


if __name__ == "__main__":
    typer.run(main)
