"""`benchmarks/routing_probe.py --sweep`: the trade-off behind the sequence router's settings
(weight decay, abstain-threshold ceiling, bundled near misses), measured on the probe sets the
router's design looked at (`dev`, `heldout`) and on the suite's test prompts. The `sealed` set is
left out of the sweep on purpose: it measures the settings once chosen (`routing_probe.py`).
The `__none__` prompts are always the bundled ones (a `__none__` file in a `--data` folder is not
read here): the sweep is about the bundled set and the settings trained on it.
Routed through `SequenceRouter.cascade` on features read once for many fits."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch
from routing_probe import OUT, load_probes, suite_cases

from loraswitch.routing.features import precomputed
from loraswitch.routing.generic import BUNDLED_TRAIN, BUNDLED_VAL
from loraswitch.routing.seq import MAX_THRESHOLD, WEIGHT_DECAY

# the router before: 300 / 60 open requests (train / val), free temperature, ceiling 0.9
BEFORE = {"label": "before: 300 open requests, free temperature, ceiling 0.9", "near_misses": False,
          "weight_decay": 1e-3, "ceiling": 0.9, "lowest_temperature": 10 ** -1.5, "bundled": (300, 60)}
GRID = [{"label": f"wd {wd:g}, ceiling {c}", "near_misses": True, "weight_decay": wd, "ceiling": c,
         "lowest_temperature": 1.0, "bundled": (BUNDLED_TRAIN, BUNDLED_VAL)}
        for wd in (1e-3, 3e-3, 1e-2) for c in (0.5, 0.6, 0.7, 0.8, 0.9)]


def _features(library: str, data: Path | None):
    """Engine, classes, the classes' train/val features and the bundled pools' (both layers)."""
    from loraswitch.console import open_switch
    from loraswitch.routing.base import NONE_CLASS
    from loraswitch.routing.data import prompts_only, read_folder
    from loraswitch.routing.features import default_layer, fast_layer, layer_features
    from loraswitch.routing.generic import generic_prompts

    engine = open_switch(None, None, library=library).engine
    if library == "demo":
        from loraswitch.demo.router_data import demo_pairs

        train, val = prompts_only(demo_pairs("train", 200)), prompts_only(demo_pairs("val", 50))
    else:
        if data is None:
            raise SystemExit("--data is required for bigbench (loraswitch data bigbench --router-data DIR)")
        train, val = (prompts_only(p) for p in read_folder(data))
    classes = [n for n in engine.names if n in train] + [NONE_CLASS]
    layers = [fast_layer(engine), default_layer(engine)]
    feats = lambda prompts: layer_features(engine, prompts, layers, progress=True)  # noqa: E731

    def labelled(d):
        prompts = [p for c in classes[:-1] for p in d.get(c, [])]
        return feats(prompts), torch.tensor([i for i, c in enumerate(classes[:-1]) for _ in d.get(c, [])])

    pools = {(split, near): feats(generic_prompts(split, n, seed=7, near_misses=near))
             for split, n in (("train", 3000), ("val", 600)) for near in (True, False)}
    return engine, classes, layers, labelled(train), labelled(val), pools


def _fit(classes, layers, cls_train, cls_val, pools, cfg: dict, draw: int):
    """Both heads on the classes' prompts and a draw of `cfg["bundled"]` bundled prompts (train,
    val); the fast head attached to the main one, as `train_selector` makes them."""
    from loraswitch.routing.seq import fit_selector

    g = torch.Generator().manual_seed(draw)
    (xt, yt), (xv, yv) = cls_train, cls_val
    pt, pv = pools[("train", cfg["near_misses"])], pools[("val", cfg["near_misses"])]
    n_train, n_val = cfg["bundled"]
    ti = torch.randperm(pt[layers[0]].shape[0], generator=g)[:n_train]
    vi = torch.randperm(pv[layers[0]].shape[0], generator=g)[:n_val]
    none = len(classes) - 1
    heads = []
    for layer in layers:
        x, y = torch.cat([xt[layer], pt[layer][ti]]), torch.cat([yt, torch.full((len(ti),), none)])
        xval, yval = torch.cat([xv[layer], pv[layer][vi]]), torch.cat([yv, torch.full((len(vi),), none)])
        heads.append(fit_selector(classes, x, y, xval, yval, layer, weight_decay=cfg["weight_decay"],
                                  ceiling=cfg["ceiling"], lowest_temperature=cfg["lowest_temperature"]))
    fast, main = heads
    main.fast = fast  # as train_selector attaches it (its reservoir goes unread: no head is added here)
    return main


def _cascade(router, engine, texts: list[str], feats: dict[int, torch.Tensor]) -> list[str | None]:
    """`SequenceRouter.cascade` (what `auto` runs) on features already read."""
    return [d.adapter for d in router.cascade(engine, texts, read=precomputed(texts, feats))[0]]


def _probe_features(engine, layers, library: str):
    from loraswitch.routing.features import layer_features

    sets = {}
    for name, probe in load_probes(library).items():
        if name == "sealed":
            continue
        if probe["nearmiss"]:
            sets[f"{name} near misses abstained"] = (probe["nearmiss"], [None] * len(probe["nearmiss"]))
        if probe["intask"]:
            sets[f"{name} in-task routed right"] = ([p for _, p in probe["intask"]], [a for a, _ in probe["intask"]])
    cases = suite_cases(library)
    sets["suite test routed right"] = ([c.prompt for c in cases], [c.task for c in cases])
    return {k: (texts, layer_features(engine, texts, layers), want) for k, (texts, want) in sets.items()}


def sweep(library: str, data: Path | None, draws: int) -> dict:
    engine, classes, layers, cls_train, cls_val, pools = _features(library, data)
    sets = _probe_features(engine, layers, library)
    rows = []
    for cfg in [BEFORE, *GRID]:
        scores = {k: [] for k in sets}
        for draw in range(draws):
            router = _fit(classes, layers, cls_train, cls_val, pools, cfg, draw)
            for k, (texts, feats, want) in sets.items():
                got = _cascade(router, engine, texts, feats)
                scores[k].append(sum(g == w for g, w in zip(got, want)) / len(want))
        rows.append({**cfg, **{k: [statistics.mean(v), statistics.pstdev(v)] for k, v in scores.items()}})
        print(cfg["label"], {k: round(v[0], 3) for k, v in rows[-1].items() if isinstance(v, list)}, flush=True)
    return {"library": library, "draws": draws, "layers": layers, "rows": rows}


def sweep_report(r: dict, plot: Path | None) -> str:
    keys = [k for k in r["rows"][0] if isinstance(r["rows"][0][k], list) and k != "bundled"]
    lines = [f"{r['library']} library, both heads (layers {r['layers'][0]} and {r['layers'][1]}) fitted {r['draws']} times "
             f"on draws of bundled `__none__` prompts ({BUNDLED_TRAIN} / {BUNDLED_VAL} for train / validation; the "
             "'before' row 300 / 60 open requests, as the router before was trained: from 648 / 76 there are, so its "
             f"draws differ little); mean (spread = population std) over the draws "
             f"(`python benchmarks/routing_probe.py --library {r['library']} --sweep`):", "",
             "| settings | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for row in r["rows"]:
        lines.append(f"| {row['label']} | " + " | ".join(f"{row[k][0]:.1%} ± {row[k][1]:.1%}" for k in keys) + " |")
    if plot is not None:
        lines += ["", f"![near misses abstained vs in-task routed right]({plot.name})"]
    return "\n".join(lines)


def _plot(r: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    near = next((k for k in r["rows"][0] if "near misses" in k and k.startswith("heldout")), None)
    intask = next((k for k in r["rows"][0] if "in-task" in k and k.startswith("heldout")), None)
    if near is None or intask is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for wd in sorted({row["weight_decay"] for row in r["rows"][1:]}):
        rows = [row for row in r["rows"][1:] if row["weight_decay"] == wd]
        ax.plot([row[near][0] for row in rows], [row[intask][0] for row in rows], "o-", label=f"weight decay {wd:g}")
        for row in rows:
            ax.annotate(f"{row['ceiling']}", (row[near][0], row[intask][0]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    b = r["rows"][0]
    ax.plot([b[near][0]], [b[intask][0]], "kx", markersize=9, label="before")
    chosen = [row for row in r["rows"][1:] if (row["weight_decay"], row["ceiling"]) == (WEIGHT_DECAY, MAX_THRESHOLD)]
    for row in chosen:
        ax.plot([row[near][0]], [row[intask][0]], "k*", markersize=14, fillstyle="none", label="committed settings")
    ax.set_xlabel("held-out near misses abstained on")
    ax.set_ylabel("held-out in-task prompts routed right")
    ax.set_title(f"{r['library']}: abstain-threshold ceiling on each point")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def sweep_main(library: str, data: Path | None, draws: int, doc: Path | None) -> None:
    from loraswitch.eval.report import update_doc

    result = sweep(library, data, draws)
    OUT.mkdir(exist_ok=True)
    (OUT / f"routing_probe_{library}_sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    plot = _plot(result, OUT / f"routing_probe_{library}_sweep.png")
    body = sweep_report(result, plot)
    (OUT / f"routing_probe_{library}_sweep.md").write_text(body + "\n")
    print(body)
    if doc is not None:
        update_doc(doc, f"routing-probe-{library}-sweep", body, images_from=OUT)
