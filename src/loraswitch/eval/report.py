"""The evaluation's human-readable outputs: `results.md` (markdown tables) and PNG plots
(matplotlib, Agg backend): accuracy per task by method, the routing confusion matrices, and a
token-level routing heatmap for a few composite prompts."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from loraswitch.eval.scoring import BASE, ROUTING_GOALS  # noqa: E402

ACCURACY_PNG = "accuracy_by_task.png"
CONFUSION_PNG = "routing_confusion.png"
HEATMAP_PNG = "routing_heatmap_{method}.png"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _resumed(results: dict) -> str:
    resumed = results["meta"].get("resumed")
    return f" (resumed {resumed})" if resumed else ""


def _ok(results: dict) -> dict[str, dict]:
    return {m: r for m, r in results["methods"].items() if r.get("status") == "ok"}


def _tasks(results: dict) -> list[str]:
    """The tasks evaluated: as resolved by the run (all of the suite's when none were named)."""
    meta = results["meta"]
    return list(meta.get("tasks") or meta["config"]["tasks"] or [])


def markdown(results: dict) -> str:
    ok = _ok(results)
    cfg = results["meta"]["config"]
    tasks = _tasks(results)
    sizes = sorted({s for r in ok.values() for s in r.get("composite", {})}, key=lambda s: int(s.split("-")[1]))
    lines = ["# loraswitch evaluation", ""]
    n_items = results["meta"].get("n_items", {})
    lines.append(f"Prompts: {', '.join(f'{k} {v}' for k, v in n_items.items())} (test split, `--limit {cfg['limit']}` per task). "
                 f"Greedy decoding, {cfg['max_new_tokens']} new tokens ({cfg['part_tokens']} per composite part). "
                 f"Adapters: {', '.join(results['meta'].get('adapters', [])) or '?'}. "
                 f"Started {results['meta']['started']}{_resumed(results)}, {results['meta']['torch_threads']} torch threads.")
    lines.append("")
    lines.append("## Summary")
    lines.append("")
    head = ["method", "family", "accuracy", "held-out wording", "training wording", "routing acc.", "abstain (out-of-suite)",
            "false abstain (in-suite)"] + [f"{s} part acc." for s in sizes] + ["answer time (s)", "gen. tok/s", "setup (s)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, r in ok.items():
        comp = r.get("composite", {})
        row = [f"`{m}`", r["family"], _pct(r["accuracy"]["overall"]), _pct(r.get("accuracy_heldout_wording")),
               _pct(r.get("accuracy_training_wording")),
               _pct(r.get("routing_accuracy", {}).get("overall")), _pct(r.get("abstain_rate")), _pct(r.get("false_abstain_rate"))]
        row += [_pct(comp.get(s, {}).get("part_accuracy")) for s in sizes]
        row += [f"{r.get('wall_s', 0):.1f}", f"{r.get('tokens_per_s') or 0:.0f}", f"{r.get('setup_s', 0):.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Accuracy: exact match on single-task prompts. Routing accuracy: the adapter that generated most "
              "answer tokens is the prompt's task. Abstain: share of out-of-suite prompts answered by the base model "
              "(higher is better); false abstain: share of in-suite prompts answered by the base model (lower is better). "
              "`–`: not applicable. Answer time excludes setup (model build, merge, classifier training).", ""]

    lines += _targets_table(results)
    lines += ["## Accuracy per task", ""]
    head = ["method"] + tasks
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, r in ok.items():
        lines.append("| " + " | ".join([f"`{m}`"] + [_pct(r["accuracy"]["per_task"].get(t)) for t in tasks]) + " |")
    routers = {m: r for m, r in ok.items() if r.get("routes")}
    if routers:
        lines += ["", "## Routing accuracy per task", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m, r in routers.items():
            lines.append("| " + " | ".join([f"`{m}`"] + [_pct(r["routing_accuracy"]["per_task"].get(t)) for t in tasks]) + " |")
    if any("num_to_french" in r for r in ok.values()):
        lines += ["", "## num_to_french: numbers never seen in training", "",
                  "| method | unseen numbers | seen numbers, held-out wording |", "|---|---|---|"]
        for m, r in ok.items():
            fr = r.get("num_to_french")
            if fr:
                lines.append(f"| `{m}` | {_pct(fr['unseen_numbers'])} (n={fr['n_unseen']}) | {_pct(fr['seen_numbers_new_wording'])} |")
    if sizes:
        lines += ["", "## Composite prompts", "",
                  "Each part scored with its own task's scorer. Oracle: each part asked alone with its own adapter.", ""]
        head = ["method"] + [f"{s}: {k}" for s in sizes for k in ("parts", "all parts", "part routing")]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m, r in ok.items():
            row = [f"`{m}`"]
            for s in sizes:
                c = r.get("composite", {}).get(s, {})
                row += [_pct(c.get("part_accuracy")), _pct(c.get("all_parts_accuracy")), _pct(c.get("part_routing_accuracy"))]
            lines.append("| " + " | ".join(row) + " |")
    notes = {m: r for m, r in results["methods"].items() if r.get("status") != "ok"}
    if notes:
        lines += ["", "## Not evaluated", ""]
        for m, r in notes.items():
            lines.append(f"- `{m}` ({r['status']}): {r.get('error', '')}")
    details = [(m, r["info"]) for m, r in ok.items() if r.get("info")]
    if details:
        lines += ["", "## Method details", ""]
        for m, info in details:
            short = {k: v for k, v in info.items() if k not in ("adapters",)}
            lines.append(f"- `{m}`: {short}")
    lines += ["", "## Plots", "", f"![accuracy]({ACCURACY_PNG})", ""]
    if routers:
        lines += [f"![routing confusion]({CONFUSION_PNG})", ""]
    for m in results.get("heatmaps", {}):
        lines += [f"![{m} routing heatmap]({HEATMAP_PNG.format(method=m)})", ""]
    return "\n".join(lines) + "\n"


def readme_summary(results: dict, details: str = "docs/evaluation.md") -> str:
    """The README's short version: one row per method, then the routing targets."""
    ok = _ok(results)
    cfg = results["meta"]["config"]
    sizes = sorted({s for r in ok.values() for s in r.get("composite", {})}, key=lambda s: int(s.split("-")[1]))
    head = ["method", "accuracy", "held-out wording", "routing acc.", "abstain (out-of-suite)"] + [f"{s} parts" for s in sizes]
    lines = [f"`--limit {cfg['limit']}` test prompts per task, {results['meta'].get('n_items', {})}; started "
             f"{results['meta']['started']}{_resumed(results)}. Full tables, plots and method notes: [{details}]({details}).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, r in ok.items():
        comp = r.get("composite", {})
        row = [f"`{m}`", _pct(r["accuracy"]["overall"]), _pct(r.get("accuracy_heldout_wording")),
               _pct(r.get("routing_accuracy", {}).get("overall")), _pct(r.get("abstain_rate"))]
        lines.append("| " + " | ".join(row + [_pct(comp.get(s, {}).get("part_accuracy")) for s in sizes]) + " |")
    skipped = [m for m, r in results["methods"].items() if r.get("status") != "ok"]
    if skipped:
        lines += ["", f"Not evaluated in this run: {', '.join(f'`{m}`' for m in skipped)} (reasons in {details})."]
    return "\n".join(lines + [""] + _targets_table(results))


def _targets_table(results: dict) -> list[str]:
    """Issue 3's bar per routing method: measured value, goal, met or not."""
    targets = results.get("routing_targets") or {}
    if not targets:
        return []
    methods = list(targets)
    lines = ["## Routing targets", "", "Each routing method against the bar for automatic routing "
             "(ratios are against the oracle adapter on the same prompts; `–`: not measured in this run).", "",
             "| target | goal | " + " | ".join(f"`{m}`" for m in methods) + " |", "|---|---|" + "---|" * len(methods)]
    unmeasured = []
    for key, (label, goal) in ROUTING_GOALS.items():
        if all(targets[m].get(key, {}).get("value") is None for m in methods):
            unmeasured.append((key, label))  # no prompt of this kind was asked: a row of dashes says nothing
            continue
        cells = []
        for m in methods:
            t = targets[m].get(key, {})
            v = t.get("value")
            cells.append("–" if v is None else f"{100 * v:.1f}%" + ("" if t["met"] else " **(not met)**"))
        lines.append(f"| {label} | >= {100 * goal:.0f}% | " + " | ".join(cells) + " |")
    if unmeasured:
        lines += ["", "Not asked in this run: " + "; ".join(f"{label} ({_WHY_UNASKED.get(key, 'no prompt of its kind')})" for key, label in unmeasured) + "."]
    return lines + [""]


# what a run needs to ask the prompts of a target that no method was measured on
_WHY_UNASKED = {
    "routing_accuracy": "no single-task prompts", "min_task_accuracy_vs_oracle": "no oracle or single-task prompts",
    "routing_accuracy_heldout_wording": "the suite has no held-out instruction templates",
    "composite-3_vs_oracle": "`--composite 3`", "composite-5_vs_oracle": "`--composite 5`",
    "composite-10_vs_oracle": "a suite of ten tasks and `--composite 10`", "abstain_rate": "no out-of-suite prompts",
    "freeform-train_vs_oracle": "`--freeform N`, demo suite", "freeform-heldout_vs_oracle": "`--freeform N`, demo suite",
}


def plot_accuracy(results: dict, path: Path) -> None:
    ok = _ok(results)
    tasks = _tasks(results) + ["overall"]
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(tasks) + 0.15 * len(tasks) * len(ok)), 4.5))
    width = 0.8 / max(1, len(ok))
    x = np.arange(len(tasks))
    cmap = plt.get_cmap("tab20")
    for i, (m, r) in enumerate(ok.items()):
        vals = [r["accuracy"]["per_task"].get(t) for t in tasks[:-1]] + [r["accuracy"]["overall"]]
        ax.bar(x + (i - (len(ok) - 1) / 2) * width, [0 if v is None else v for v in vals], width, label=m, color=cmap(i % 20))
    ax.set_xticks(x, tasks, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("exact-match accuracy")
    ax.set_title("Accuracy per task by method")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(results: dict, path: Path) -> bool:
    routers = {m: r for m, r in _ok(results).items() if r.get("confusion")}
    if not routers:
        return False
    tasks = _tasks(results)
    rows = tasks + ["out-of-suite"]
    chosen = sorted({c for r in routers.values() for row in r["confusion"].values() for c in row} - {BASE} - set(tasks))
    cols = tasks + chosen + [BASE]
    n = len(routers)
    fig, axes = plt.subplots(1, n, figsize=(max(4.5, 0.45 * len(cols) + 2.5) * n, 0.45 * len(rows) + 2.2), squeeze=False)
    for ax, (m, r) in zip(axes[0], routers.items()):
        mat = np.zeros((len(rows), len(cols)))
        for i, t in enumerate(rows):
            row = r["confusion"].get(t, {})
            total = sum(row.values()) or 1
            for j, c in enumerate(cols):
                mat[i, j] = row.get(c, 0) / total
        ax.imshow(mat, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        for i in range(len(rows)):
            for j in range(len(cols)):
                if mat[i, j] > 0:
                    ax.text(j, i, f"{mat[i, j]:.0%}", ha="center", va="center", fontsize=6,
                            color="white" if mat[i, j] > 0.6 else "black")
        ax.set_xlabel("chosen adapter")
        ax.set_ylabel("true task")
        ax.set_title(f"routing: {m}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_heatmap(method: str, traces: list[dict], adapters: list[str], path: Path, max_tokens: int = 80) -> None:
    """Tokens on the x axis, adapters (and "base": weight left to no adapter) on the y axis.
    Part separators written by the assembly ("\\n2. "), not by any model, are grey columns."""
    names = sorted({a for t in traces for e in t["trace"] for a in e["adapters"]} | set(adapters)) + [BASE]
    fig, axes = plt.subplots(len(traces), 1, figsize=(min(24, 2 + 0.22 * max_tokens), (0.3 * len(names) + 1.6) * len(traces)),
                             squeeze=False)
    for ax, t in zip(axes[:, 0], traces):
        steps = t["trace"][:max_tokens]
        mat = np.zeros((len(names), len(steps)))
        for j, e in enumerate(steps):
            if e.get("separator"):
                mat[:, j] = np.nan
                continue
            for a, w in e["adapters"].items():
                mat[names.index(a), j] = w
            mat[-1, j] = max(0.0, 1.0 - sum(e["adapters"].values()))
        cmap = plt.get_cmap("viridis").copy()
        cmap.set_bad("lightgrey")
        ax.imshow(np.ma.masked_invalid(mat), aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        labels = [repr(e.get("token", ""))[1:-1][:8] for e in steps]
        ax.set_xticks(range(len(steps)), labels, rotation=90, fontsize=6)
        truth = ", ".join(f"{i}. {p['task']}" for i, p in enumerate(t["parts"], 1))
        ax.set_title(f"{method} on {t['id']} (parts: {truth})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    written = [out_dir / "results.md"]
    written[0].write_text(markdown(results))
    if _ok(results):
        plot_accuracy(results, out_dir / ACCURACY_PNG)
        written.append(out_dir / ACCURACY_PNG)
    if plot_confusion(results, out_dir / CONFUSION_PNG):
        written.append(out_dir / CONFUSION_PNG)
    adapters = results["meta"].get("adapters", [])
    for method, traces in results.get("heatmaps", {}).items():
        p = out_dir / HEATMAP_PNG.format(method=method)
        plot_heatmap(method, traces, adapters, p)
        written.append(p)
    return written


def update_doc(doc: Path, name: str, body: str, images_from: Path | None = None) -> None:
    """Replace the text between `<!-- generated:NAME:start -->` and `<!-- generated:NAME:end -->`
    in `doc` with `body` (markdown written by a command, never typed by hand). Image links in
    `body` are relative to `images_from`; they are rewritten relative to the doc's folder."""
    import os
    import re

    doc = Path(doc)
    start, end = f"<!-- generated:{name}:start -->", f"<!-- generated:{name}:end -->"
    if images_from is not None:
        rel = os.path.relpath(Path(images_from).resolve(), doc.resolve().parent)
        body = re.sub(r"!\[([^\]]*)\]\(([^)/]+)\)", lambda m: f"![{m.group(1)}]({rel}/{m.group(2)})", body)
    body = re.sub(r"^# .*\n", "", body, count=1)  # the doc has its own title
    body = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", body, flags=re.M)  # one level deeper
    text = doc.read_text() if doc.is_file() else f"{start}\n{end}\n"
    if start not in text or end not in text:
        text = text.rstrip("\n") + f"\n\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{start}\n{body.strip()}\n{end}{tail}")
