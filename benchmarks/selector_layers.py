#!/usr/bin/env python
"""Which decoder layer can the sequence selector read? (issue 17: `auto`'s feature pass costs
layer + 1 decoder layers over every prompt before its prefill.)

    python benchmarks/selector_layers.py --library demo --layers 2,3,4,5,6,8,15
    python benchmarks/selector_layers.py --library bigbench --layers 2,4,6,8,15 --data /tmp/bb_router_data

For each layer, the selector `loraswitch train-router --router seq` trains (same prompts, same
softmax regression, temperature and abstain threshold: `routing.seq.fit_selector`) is fitted on
that layer's features, all layers read in one feature pass, and its decisions are scored on the
suite's test prompts (`--test` per task) and out-of-suite prompts (2x): routing accuracy, on
held-out wording (prompts phrased with instruction templates never used in training, where the
suite varies them), the worst task's, out-of-suite prompts abstained on, in-suite prompts
abstained on. Routing only (no generation): the same decisions the eval's `seq` makes.
Writes benchmarks/results/selector_layers_<library>.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import typer

OUT = Path(__file__).resolve().parent / "results"


def _training(library: str, data: Path | None):
    from loraswitch.routing.data import prompts_only, read_folder

    if library == "demo":
        from loraswitch.demo.router_data import demo_pairs

        return prompts_only(demo_pairs("train", 200)), prompts_only(demo_pairs("val", 50))
    if data is None:
        raise typer.BadParameter("--data is required for bigbench (loraswitch data bigbench --router-data DIR)")
    train, val = read_folder(data)
    return prompts_only(train), prompts_only(val)


def _score(router, engine, feats, cases, oos_feats) -> dict:
    def decide(f):
        return [d.adapter for d in router.route_features(engine, f)]

    got, oos = decide(feats), decide(oos_feats)
    ok = [a == c.task for a, c in zip(got, cases)]
    heldout = [o for o, c in zip(ok, cases) if c.heldout_template]
    tasks = sorted({c.task for c in cases})
    per_task = {t: sum(o for o, c in zip(ok, cases) if c.task == t) / sum(c.task == t for c in cases) for t in tasks}
    worst = min(per_task, key=per_task.get)
    return {"routing": sum(ok) / len(ok), "heldout_wording": sum(heldout) / len(heldout) if heldout else None,
            "heldout_prompts": len(heldout), "worst_task": [worst, per_task[worst]],
            "oos_abstain": sum(a is None for a in oos) / len(oos), "false_abstain": sum(a is None for a in got) / len(got),
            "temperature": router.temperature, "threshold": router.threshold,
            "wrong": [{"task": c.task, "routed": a, "prompt": c.prompt[:80]} for a, c, o in zip(got, cases, ok) if not o][:10]}


def main(library: str = "demo", layers: str = "4,5,6,8,15", test: int = 30, data: Path | None = None,
         out: Path | None = None) -> None:
    from loraswitch.console import open_switch
    from loraswitch.demo.suites import suite_for
    from loraswitch.routing.base import NONE_CLASS
    from loraswitch.routing.features import layer_features
    from loraswitch.routing.seq import fit_selector

    torch.manual_seed(0)
    wanted = sorted({int(x) for x in layers.split(",")})
    engine = open_switch(None, None, library=library).engine
    train, val = _training(library, data)
    classes = [n for n in engine.names if n in train] + [NONE_CLASS]

    def featurize(d: dict[str, list[str]]):
        prompts = [p for c in classes for p in d.get(c, [])]
        labels = torch.tensor([i for i, c in enumerate(classes) for _ in d.get(c, [])])
        return layer_features(engine, prompts, wanted, progress=True), labels

    t0 = time.perf_counter()
    (x, y), (xv, yv) = featurize(train), featurize(val)
    suite = suite_for(library)
    cases = [c for t in suite.task_names for c in suite.examples(t, "test", test, seed=0)]
    feats = layer_features(engine, [c.prompt for c in cases], wanted)
    oos = layer_features(engine, suite.out_of_suite("test", 2 * test, seed=0), wanted)
    result = {"library": library, "train_prompts": len(y), "val_prompts": len(yv), "test_prompts": len(cases),
              "oos_prompts": oos[wanted[0]].shape[0], "layers": {}}
    for layer in wanted:
        router = fit_selector(classes, x[layer], y, xv[layer], yv, layer)
        result["layers"][str(layer)] = _score(router, engine, feats[layer], cases, oos[layer])
        print(layer, json.dumps({k: v for k, v in result["layers"][str(layer)].items() if k != "wrong"}), flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = out or OUT / f"selector_layers_{library}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(out)


if __name__ == "__main__":
    typer.run(main)
