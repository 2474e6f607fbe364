"""A library that grows (issue 14): routing after adapters are added, measured on the demo suite.

    python benchmarks/growing_library.py            # ~15 min on 2 busy CPU cores (features cached)
    python benchmarks/growing_library.py --quick    # no Arrow baseline, fewer scale points
    python benchmarks/growing_library.py --doc docs/routing.md   # also rewrite the docs block

Writes benchmarks/results/growing_library.{json,md}. Sections:

* hot-load: the committed demo selector, then one unrelated adapter (random weights shaped like a
  demo adapter, no examples) hot-loaded: share of the demo test split routed right before and
  after, and how many decisions changed (an unchanged decision is an unchanged greedy answer).
* leave-one-out: for each demo adapter, a selector trained without it (same data and recipe as
  the committed one), plus (a) a head from 20 of its training prompts, (b) a zero-shot head:
  share of its test prompts routed to it, and the others' test prompts routed right. Arrow (the
  per-token zero-shot baseline) on the full library for comparison.
* zero-shot variants: the same leave-one-out for every `routing.zeroshot` variant.
* scale: routing time per prompt with 8, 64 and 1,000 adapters loaded (random rank-4 q/v
  adapters beside the demo ones), split into the feature pass and the decision after it.

The demo suite is read here (loraswitch.demo), never by the routing package.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from loraswitch.base import cache_dir, load_base
from loraswitch.constants import DEMO_ADAPTER_DIR, DEMO_ROUTER_DIR
from loraswitch.demo.router_data import demo_pairs
from loraswitch.demo.tasks import TASK_NAMES, examples, out_of_suite
from loraswitch.engine import Engine
from loraswitch.library import Adapter, LoraModule
from loraswitch.routing.added import AddedHeads, Known, Space, factor, fit_examples_head, fit_zero_shot_head
from loraswitch.routing.arrow import ArrowRouter
from loraswitch.routing.base import NONE_CLASS
from loraswitch.routing.features import prompt_features
from loraswitch.routing.seq import SequenceRouter, fit_selector
from loraswitch.routing.zeroshot import VARIANTS
from loraswitch.switch import Switch

RESULTS = Path(__file__).parent / "results"
N_TEST = 40  # test prompts per task (and out of suite)
N_EXAMPLES = 20


# ------------------------------------------------------------------------- data and features
def suite() -> dict[str, dict[str, list[str]]]:
    """The prompts the committed selector was trained on (train 200 / val 50 per class, training
    wording only) and the test split (every wording) with out-of-suite prompts."""
    train = {k: [p for p, _ in v] for k, v in demo_pairs("train", 200).items()}
    val = {k: [p for p, _ in v] for k, v in demo_pairs("val", 50).items()}
    test = {t: [e.prompt for e in examples(t, "test", N_TEST)] for t in TASK_NAMES}
    test[NONE_CLASS] = out_of_suite("test", N_TEST)
    return {"train": train, "val": val, "test": test}


def bigbench_suite(work: Path) -> dict[str, dict[str, list[str]]]:
    """What the committed BIG-bench selector was trained on (`loraswitch data bigbench
    --router-data`, 200 train prompts per task, read as `train-router --data` reads it, generic
    prompts as the no-adapter class) and `N_TEST` test prompts per task plus generic ones."""
    from loraswitch.demo.bigbench.tasks import TASK_NAMES as BB_TASKS
    from loraswitch.demo.bigbench.tasks import examples as bb_examples
    from loraswitch.demo.router_data import write_bigbench_router_data
    from loraswitch.routing.data import prompts_only, read_folder
    from loraswitch.routing.generic import generic_prompts

    write_bigbench_router_data(work / "router_data", 200)
    train, val = (prompts_only(x) for x in read_folder(work / "router_data"))
    test = {t: [e.prompt for e in bb_examples(t, "test", N_TEST)] for t in BB_TASKS}
    test[NONE_CLASS] = generic_prompts("test", N_TEST)
    return {"train": train, "val": val, "test": test}


def features(engine: Engine, prompts: list[str], layer: int) -> torch.Tensor:
    """prompt_features, cached on disk by (prompts, layer): the leave-one-out reuses them."""
    key = hashlib.sha1(json.dumps([prompts, layer, engine.base.name]).encode()).hexdigest()[:16]
    path = cache_dir() / "bench" / f"features-{key}.pt"
    if path.is_file():
        return torch.load(path)
    out = prompt_features(engine, prompts, layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def featurize(engine: Engine, data: dict, layer: int) -> dict[str, dict[str, torch.Tensor]]:
    return {split: {c: features(engine, ps, layer) for c, ps in by_class.items()} for split, by_class in data.items()}


def accuracy(decisions, want: list[str | None]) -> float:
    return sum(d.adapter == w for d, w in zip(decisions, want)) / max(1, len(want))


def test_set(F: dict, skip: str | None = None) -> tuple[torch.Tensor, list[str | None]]:
    classes = [c for c in F["test"] if c != skip]
    x = torch.cat([F["test"][c] for c in classes])
    want = [None if c == NONE_CLASS else c for c in classes for _ in range(len(F["test"][c]))]
    return x, want


# ------------------------------------------------------------------------- hot-load
def unrelated_adapter(folder: Path, like: str = "iso_date", seed: int = 0) -> Path:
    """A demo adapter's config with random weights of the same per-tensor scale, under a new name."""
    from safetensors.torch import load_file, save_file

    src = DEMO_ADAPTER_DIR / like
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "adapter_config.json", folder / "adapter_config.json")
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=g) * v.float().std() for k, v in load_file(src / "adapter_model.safetensors").items()}
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def hot_load(sw: Switch, F: dict, work: Path) -> dict:
    engine = sw.engine
    x, want = test_set(F)
    before = sw.router("seq").route_features(engine, x)
    t = time.perf_counter()
    engine.load_adapter(unrelated_adapter(work / "unrelated"))
    router = sw.router("auto").inner
    build_s = time.perf_counter() - t
    after = router.route_features(engine, x)
    changed = sum((a.adapter, a.confidence) != (b.adapter, b.confidence) for a, b in zip(after, before))
    out = {"prompts": len(want), "routed_right_before": accuracy(before, want), "routed_right_after": accuracy(after, want),
           "decisions_changed": changed, "claimed_by_unrelated": sum(d.adapter == "unrelated" for d in after),
           "head": router.added["unrelated"].describe(), "build_s": round(build_s, 2)}
    # the same adapter taught by 20 prompts of a task the suite does not have: end-to-end time
    engine.remove_adapter("unrelated")
    prompts = [f"Translate into German: the {w} is on the table" for w in
               ("cat", "book", "lamp", "cup", "phone", "key", "apple", "pen", "bag", "hat",
                "plate", "clock", "shoe", "map", "ball", "fork", "coin", "box", "card", "glass")]
    t = time.perf_counter()
    engine.load_adapter(work / "unrelated", name="german", examples=prompts)
    head = sw.router("auto").inner.added["german"]
    out["few_shot_load_to_routable_s"] = round(time.perf_counter() - t, 2)
    out["few_shot_head"] = head.describe()
    engine.remove_adapter("german")
    return out


# ------------------------------------------------------------------------- leave-one-out
def loo_selector(F: dict, held: str, layer: int) -> SequenceRouter:
    classes = [c for c in F["train"] if c != held]

    def xy(split):
        x = torch.cat([F[split][c] for c in classes])
        y = torch.cat([torch.full((len(F[split][c]),), i) for i, c in enumerate(classes)])
        return x, y

    return fit_selector(classes, *xy("train"), *xy("val"), layer)


def attach(router: SequenceRouter, engine: Engine) -> AddedHeads:
    """Fresh added heads for `router` (what `routing.added.sync_added` sets up)."""
    z_res, raw = router.reservoir.z.float(), router.raw_reservoir()
    heads = AddedHeads()
    heads.space = Space(router.W, router.b, z_res, router.reservoir.labels)
    heads.known = Known([factor(engine, n) for n in router.classes if n in engine.adapters], raw)
    router.added = heads
    return heads


def score(router: SequenceRouter, engine: Engine, F: dict, held: str) -> tuple[float, float]:
    mine = router.route_features(engine, F["test"][held])
    x, want = test_set(F, skip=held)
    return sum(d.adapter == held for d in mine) / len(mine), accuracy(router.route_features(engine, x), want)


def leave_one_out(sw: Switch, F: dict, data: dict, layer: int, variants: tuple[str, ...],
                  tasks: tuple[str, ...] = TASK_NAMES) -> list[dict]:
    engine, rows = sw.engine, []
    for held in tasks:
        router = loo_selector(F, held, layer)
        row = {"adapter": held}
        attach(router, engine)
        row["others_trained_only"] = score(router, engine, F, held)[1]
        t = time.perf_counter()
        z = (prompt_features(engine, data["train"][held][:N_EXAMPLES], layer) - router.mean) / router.std
        heads = attach(router, engine)
        heads[held] = fit_examples_head(held, "", z, heads.space, router.reservoir.z.float(), "bench")
        row["few_shot_fit_s"] = round(time.perf_counter() - t, 2)
        row["few_shot"], row["few_shot_others"] = score(router, engine, F, held)
        for variant in variants:
            heads = attach(router, engine)
            heads[held] = fit_zero_shot_head(engine, held, router.raw_reservoir(), heads.known, variant)
            row[f"zero_shot_{variant}"], row[f"zero_shot_{variant}_others"] = score(router, engine, F, held)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def arrow_baseline(sw: Switch, data: dict, n: int = 10) -> dict:
    """Arrow on the full library (per token, top-1): share of each task's test prompts routed to it."""
    router = ArrowRouter(sw.engine)
    return {t: sum(d.adapter == t for d in router.route(sw.engine, data["test"][t][:n])) / n for t in TASK_NAMES}


# ------------------------------------------------------------------------- scale
def random_adapter(engine: Engine, name: str, seed: int, rank: int = 4) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for key in engine.layers:
        if key.endswith(("q_proj", "v_proj")):
            w = engine.layers[key].base.weight
            modules[key] = LoraModule(torch.randn(rank, w.shape[1], generator=g) * 0.02,
                                      torch.randn(w.shape[0], rank, generator=g) * 0.02, 2.0)
    return Adapter(name, modules)


def scale(data: dict, sizes: tuple[int, ...], work: Path, repeats: int = 3) -> list[dict]:
    """Routing time with n random rank-4 q/v adapters loaded on a fresh copy of the base, routed
    by the demo selector (whose own classes are then all removed) plus one zero-shot head each.
    Random-only because the engine pads every slot of a layer to the largest rank there: the
    demo adapters (rank up to 16 on all seven projections) beside 1,000 slots would need ~12 GB."""
    engine, rows = Engine(load_base()), []
    prompts = [p for t in TASK_NAMES for p in data["test"][t][:4]]
    routers = work / "scale_routers"
    shutil.copy(DEMO_ROUTER_DIR / "seq_router.safetensors", routers.mkdir() or routers / "seq_router.safetensors")
    engine.add_adapter(random_adapter(engine, "random0000", 0))
    for layer in engine.layers.values():
        layer.reserve(max(sizes) + 1)  # grow the stacks once, not once per adapter
    for n in sizes:
        t = time.perf_counter()
        while len(engine.names) < n:
            engine.add_adapter(random_adapter(engine, f"random{len(engine.names):04d}", len(engine.names)))
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        router = SequenceRouter.load(routers, engine)
        build_s = time.perf_counter() - t
        feats, decide = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f = prompt_features(engine, prompts, router.layer)
            t1 = time.perf_counter()
            router.route_features(engine, f)
            feats.append(t1 - t0)
            decide.append(time.perf_counter() - t1)
        feat_ms, decide_ms = 1000 * min(feats) / len(prompts), 1000 * min(decide) / len(prompts)
        total_ms = feat_ms + decide_ms
        rows.append({"adapters": n, "added_heads": len(router.added), "load_s": round(load_s, 1),
                     "router_build_s": round(build_s, 1), "feature_ms_per_prompt": round(feat_ms, 2),
                     "decision_ms_per_prompt": round(decide_ms, 3), "total_ms_per_prompt": round(total_ms, 2)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    for r in rows:
        r["total_vs_first"] = round(r["total_ms_per_prompt"] / rows[0]["total_ms_per_prompt"], 3)
    return rows


# ------------------------------------------------------------------------- report
def markdown(res: dict) -> str:
    h = res["hot_load"]
    lines = ["Hot-load of one unrelated adapter (random weights shaped like `iso_date`, no examples), "
             f"demo test split ({h['prompts']} prompts, {N_TEST} per task and out of suite):", "",
             "| | routed right | decisions changed |", "|---|---|---|",
             f"| committed selector, nothing added | {h['routed_right_before']:.1%} | – |",
             f"| after the hot-load | {h['routed_right_after']:.1%} | {h['decisions_changed']} "
             f"({h['claimed_by_unrelated']} claimed by it) |", "",
             f"Head fitted in {h['build_s']} s; a new adapter with 20 example prompts is routable "
             f"{h['few_shot_load_to_routable_s']} s after the load call.", "",
             "Leave-one-out (selector trained without the adapter; share of its test prompts routed to it, "
             "and of the others' test prompts routed right):", ""]
    lines += loo_table(res["leave_one_out"], res.get("arrow"))
    lines += ["", "Routing cost per prompt (n random rank-4 q/v adapters, each routed by a zero-shot head; "
              f"{8 * 4} demo test prompts, best of 3):", "",
              "| adapters | feature pass ms | decision ms | total ms | vs 8 | head fitting s |", "|---|---|---|---|---|---|"]
    for r in res["scale"]:
        lines.append(f"| {r['adapters']} | {r['feature_ms_per_prompt']} | {r['decision_ms_per_prompt']} | "
                     f"{r['total_ms_per_prompt']} | {r['total_vs_first']}x | {r['router_build_s']} |")
    lines += ["", f"BIG-bench library: {res['bigbench']}"]
    return "\n".join(lines) + "\n"


def loo_table(rows: list[dict], arrow: dict | None) -> list[str]:
    """The leave-one-out table: few-shot and every zero-shot variant, with a mean row."""
    variants = [k[len("zero_shot_"):] for k in rows[0] if k.startswith("zero_shot_") and not k.endswith("_others")]
    head = "| adapter | 20 examples | others | " + " | ".join(f"zero-shot `{v}` | others" for v in variants)
    head += " | Arrow (per token, full library) |" if arrow else " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows + [_mean_row(rows)]:
        cells = [r["adapter"], f"{r['few_shot']:.0%}", f"{r['few_shot_others']:.1%}"]
        cells += [c for v in variants for c in (f"{r[f'zero_shot_{v}']:.0%}", f"{r[f'zero_shot_{v}_others']:.1%}")]
        if arrow:
            cells.append(f"{(arrow.get(r['adapter']) if r['adapter'] in arrow else sum(arrow.values()) / len(arrow)):.0%}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _mean_row(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k != "adapter"]
    return {"adapter": "**mean**", **{k: sum(r[k] for r in rows) / len(rows) for k in keys}}


def write_doc(doc: Path, md: str, name: str = "growing") -> None:
    start, end = f"<!-- generated:{name}:start -->", f"<!-- generated:{name}:end -->"
    text = doc.read_text()
    block = f"{start}\n{md}{end}"
    text = text[: text.index(start)] + block + text[text.index(end) + len(end):] if start in text else text + "\n" + block + "\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="no Arrow baseline, scale to 64 adapters only")
    ap.add_argument("--doc", type=Path, help="rewrite the generated block of this markdown file")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--scale-only", action="store_true", help="only the routing-cost section (writes growing_library_scale.json)")
    ap.add_argument("--library", choices=("demo", "bigbench"), default="demo",
                    help="bigbench: the leave-one-out on the BIG-bench library (needs `loraswitch data bigbench`)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.library == "bigbench":
        return bigbench_main(args)
    if args.scale_only:
        with tempfile.TemporaryDirectory() as tmp:
            rows = scale(suite(), (8, 64) if args.quick else (8, 64, 1000), Path(tmp))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "growing_library_scale.json").write_text(json.dumps(rows, indent=1))
        print(json.dumps(rows, indent=1))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(DEMO_ROUTER_DIR, work / "demo_routers")
        sw = Switch(router_dir=work / "demo_routers")  # added heads go to the copy, never the cache
        layer = sw.router("seq").layer
        data = suite()
        F = featurize(sw.engine, data, layer)
        res = {"hot_load": hot_load(sw, F, work)}
        print(json.dumps(res["hot_load"]), file=sys.stderr, flush=True)
        res["leave_one_out"] = leave_one_out(sw, F, data, layer, VARIANTS)
        res["arrow"] = None if args.quick else arrow_baseline(sw, data)
        res["scale"] = scale(data, (8, 64) if args.quick else (8, 64, 1000), work)
    bigbench = Path(__file__).parents[1] / "src/loraswitch/libraries/bigbench"
    res["bigbench"] = ("not run: the library has no trained seq router yet"
                       if not (bigbench / "routers" / "seq_router.safetensors").is_file() else
                       "leave-one-out by `python benchmarks/growing_library.py --library bigbench` "
                       "(growing_library_bigbench.md)")
    args.out.mkdir(parents=True, exist_ok=True)
    md = markdown(res)
    (args.out / "growing_library.json").write_text(json.dumps(res, indent=1))
    (args.out / "growing_library.md").write_text(md)
    if args.doc:
        write_doc(args.doc, md)
    print(md)


def bigbench_main(args: argparse.Namespace) -> None:
    """Leave-one-out on the BIG-bench library: the selector retrained without each adapter, then
    (a) 20 of its training prompts, (b) zero-shot heads; written to growing_library_bigbench.*."""
    from loraswitch.console import library_paths
    from loraswitch.demo.bigbench.tasks import TASK_NAMES as BB_TASKS

    adapters, routers = library_paths("bigbench", None, None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(routers, work / "routers")
        sw = Switch(None, adapters, work / "routers")  # added heads go to the copy
        layer = sw.router("seq").layer
        data = bigbench_suite(work)
        F = featurize(sw.engine, data, layer)
        rows = leave_one_out(sw, F, data, layer, VARIANTS, tuple(BB_TASKS))
    res = {"library": "bigbench", "test_per_task": N_TEST, "leave_one_out": rows}
    md = ("Leave-one-out on the BIG-bench library (selector trained without the adapter on the same "
          f"router data; {N_TEST} test prompts per task and {N_TEST} generic ones; share of its test prompts "
          "routed to it, and of the others' routed right):\n\n" + "\n".join(loo_table(rows, None)) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "growing_library_bigbench.json").write_text(json.dumps(res, indent=1))
    (args.out / "growing_library_bigbench.md").write_text(md)
    if args.doc:
        write_doc(args.doc, md, "growing-bigbench")
    print(md)


if __name__ == "__main__":
    main()
