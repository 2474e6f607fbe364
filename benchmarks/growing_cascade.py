"""What `auto` decides and reads once the library has grown (issues 14 and 17), end to end.

`growing_library.py`'s leave-one-out scores the main head and the added heads on the main-layer
features alone. `auto` runs `SequenceRouter.cascade`: the fast head (layer 5) first; once an
adapter was added, the prompts it picks a trained adapter for at less than `seq.FAST_SURE` are
also read at the main layer (15), where the added heads claim; before FAST_SURE every prompt was
read there once the library had grown (what that costs: `auto_cost.py --grow`). Here, per demo
adapter: a selector (main and fast head) trained without
it on the committed recipe, a head for it from 20 of its training prompts, and the demo test split
(its prompts, the others' and out-of-suite ones) and the validation split routed through the
cascade at several FAST_SURE values, 1.01 being every prompt read at the main layer (the behaviour
before it): share of its prompts routed to it, of the others' routed right, and of all prompts
read at the main layer.

    python benchmarks/growing_cascade.py [--doc docs/routing.md]     # ~5 min on one core (features cached)
    python benchmarks/growing_cascade.py --library bigbench          # the BIG-bench library's selector

Writes benchmarks/results/growing_cascade[_bigbench].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from growing_library import N_EXAMPLES, RESULTS, attach, bigbench_suite, featurize, loo_selector, suite, write_doc

from loraswitch.routing import seq as seq_module
from loraswitch.routing.added import fit_examples_head
from loraswitch.routing.base import NONE_CLASS
from loraswitch.routing.features import fast_layer, precomputed, prompt_features
from loraswitch.routing.seq import SequenceRouter
from loraswitch.switch import Switch

SWEEP = (0.9, 0.95, 0.98, 0.99, 0.995, 1.01)  # FAST_SURE values tried; 1.01: every prompt read at layer 15 (before)
BEFORE = 1.01


def split_rows(F: dict, F_fast: dict, split: str, layer: int, fast: int) -> tuple[list[str], dict[int, torch.Tensor], list[str | None]]:
    """A split's classes, their features at both layers, and the answer each prompt wants."""
    classes = list(F[split])
    feats = {layer: torch.cat([F[split][c] for c in classes]), fast: torch.cat([F_fast[split][c] for c in classes])}
    want = [None if c == NONE_CLASS else c for c in classes for _ in range(len(F[split][c]))]
    return classes, feats, want


def counting(read, layer: int, reads: list[int]):
    """`read`, noting how many texts each call reads at `layer`."""
    def counted(engine, texts: list[str], at: int) -> torch.Tensor:
        if at == layer:
            reads.append(len(texts))
        return read(engine, texts, at)
    return counted


def held_out(sw: Switch, data: dict, F: dict, F_fast: dict, layer: int, fast: int, held: str) -> dict:
    """The cascade of a selector trained without `held`, with `held` added from 20 examples."""
    engine = sw.engine
    router = loo_selector(F, held, layer)
    head = loo_selector(F_fast, held, fast)
    router.fast = SequenceRouter(head.classes, head.W, head.b, head.mean, head.std, fast, head.temperature,
                                 head.threshold)
    z = (prompt_features(engine, data["train"][held][:N_EXAMPLES], layer) - router.mean) / router.std
    heads = attach(router, engine)
    heads[held] = fit_examples_head(held, "", z, heads.space, router.reservoir.z.float(), "bench")
    row: dict = {"adapter": held}
    committed = seq_module.FAST_SURE
    for split in ("val", "test"):
        classes, feats, want = split_rows(F, F_fast, split, layer, fast)
        texts = [t for c in classes for t in data[split][c]]
        for sure in SWEEP:
            seq_module.FAST_SURE = sure
            try:
                reads: list[int] = []
                decisions, _ = router.cascade(engine, texts, read=counting(precomputed(texts, feats), layer, reads))
            finally:
                seq_module.FAST_SURE = committed
            mine = [d.adapter == held for d, w in zip(decisions, want) if w == held]
            others = [d.adapter == w for d, w in zip(decisions, want) if w != held]
            row[f"{split} {sure}"] = {"held": sum(mine) / len(mine), "others": sum(others) / len(others),
                                      "read_at_main": sum(reads) / len(texts)}
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def markdown(rows: list[dict], library: str = "demo") -> str:
    committed = seq_module.FAST_SURE
    mean = {k: {m: sum(r[k][m] for r in rows) / len(rows) for m in rows[0][k]} for k in rows[0] if k != "adapter"}
    lines = ["`auto`'s cascade after an adapter is added (leave-one-out: a selector and fast head trained "
             f"without the adapter, a head for it from {N_EXAMPLES} examples): means over the {len(rows)} {library} adapters "
             "of the share of its prompts routed to it, of the others' routed right, and of every prompt read "
             f"at layer 15, per FAST_SURE ({BEFORE}: every prompt read there, the behaviour before it; "
             f"committed: {committed}). Validation split (training wording) and test split:", "",
             "| FAST_SURE | val: its prompts | others | read at 15 | test: its prompts | others | read at 15 |",
             "|---|---|---|---|---|---|---|"]
    for sure in SWEEP:
        cells = [f"**{sure}** (committed)" if sure == committed else f"{sure} (before)" if sure == BEFORE else f"{sure}"]
        cells += [c for split in ("val", "test") for m in [mean[f"{split} {sure}"]]
                  for c in (f"{m['held']:.1%}", f"{m['others']:.1%}", f"{m['read_at_main']:.0%}")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Per adapter, test split, FAST_SURE {committed} against {BEFORE}:", "",
              "| adapter | its prompts | others | read at 15 | before: its prompts | others | read at 15 |",
              "|---|---|---|---|---|---|---|"]
    for r in rows + [{"adapter": "**mean**", **mean}]:
        cells = [r["adapter"]] + [c for sure in (committed, BEFORE) for m in [r[f"test {sure}"]]
                                  for c in (f"{m['held']:.0%}", f"{m['others']:.1%}", f"{m['read_at_main']:.0%}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--library", choices=("demo", "bigbench"), default="demo")
    ap.add_argument("--doc", type=Path, help="rewrite the generated block `growing-cascade[-bigbench]` of this markdown file")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    from loraswitch.console import library_paths

    adapters, routers = library_paths(args.library, None, None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(routers, work / "routers")  # added heads go to the copy
        sw = Switch(None, adapters, work / "routers")
        layer, fast = sw.router("seq").layer, fast_layer(sw.engine)
        data = suite() if args.library == "demo" else bigbench_suite(work)
        F, F_fast = featurize(sw.engine, data, layer), featurize(sw.engine, data, fast)
        tasks = [c for c in data["train"] if c != NONE_CLASS]
        rows = [held_out(sw, data, F, F_fast, layer, fast, held) for held in tasks]
    md = markdown(rows, args.library)
    tag = "" if args.library == "demo" else f"_{args.library}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"growing_cascade{tag}.json").write_text(json.dumps({"fast_sure": seq_module.FAST_SURE, "rows": rows}, indent=1))
    (RESULTS / f"growing_cascade{tag}.md").write_text(md)
    if args.doc:
        write_doc(args.doc, md, "growing-cascade" + tag.replace("_", "-"))
    print(md)


if __name__ == "__main__":
    main()
