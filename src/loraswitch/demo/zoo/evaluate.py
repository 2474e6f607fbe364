"""`loraswitch zoo eval`: measure each adapter of a library, and the base model, on the adapter's
own held-out test split (the suite's metric), and record the numbers in the manifest.

Bars: demo, >= 85% exact match and >= 50 points above the base model (its tasks are synthetic and
fully learnable); bigbench, >= 10 points above the base model (real tasks on a 135M base).
"""

from __future__ import annotations

from tqdm.auto import tqdm

from loraswitch.eval.suite import Case, Suite
from loraswitch.generate import SamplingParams

# library -> (minimum accuracy or None, minimum margin over the base model)
BARS: dict[str, tuple[float | None, float]] = {"demo": (0.85, 0.50), "bigbench": (None, 0.10)}
MAX_NEW_TOKENS = {"demo": 40, "bigbench": 48}


def answer_accuracy(switch, suite: Suite, cases: list[Case], model: str, max_new_tokens: int = 40) -> list[bool]:
    """Correctness of `model` ("base", an adapter, or "auto") on each case, by the suite's metric."""
    gens = switch.chat([c.prompt for c in cases], model=model, params=SamplingParams(max_new_tokens=max_new_tokens))
    return [suite.score(c, g.text) for c, g in zip(cases, gens)]


def _rate(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def evaluate_adapter(switch, suite: Suite, task: str, n: int = 200) -> dict:
    cases = suite.examples(task, "test", n)
    max_new = MAX_NEW_TOKENS.get(suite.name, 40)
    ours = answer_accuracy(switch, suite, cases, task, max_new)
    base = answer_accuracy(switch, suite, cases, "base", max_new)
    result = {"n_test": len(cases), "adapter_accuracy": _rate(ours), "base_accuracy": _rate(base)}
    if any(c.heldout_template is not None for c in cases):
        result["adapter_accuracy_heldout_wording"] = _rate([ok for ok, c in zip(ours, cases) if c.heldout_template])
    if any(c.seen_payload for c in cases):
        result["adapter_accuracy_unseen_inputs"] = _rate([ok for ok, c in zip(ours, cases) if not c.seen_payload])
        result["adapter_accuracy_seen_inputs_new_wording"] = _rate([ok for ok, c in zip(ours, cases) if c.seen_payload])
    min_acc, margin = BARS.get(suite.name, (None, 0.10))
    result["meets_bar"] = bool((min_acc is None or result["adapter_accuracy"] >= min_acc)
                               and result["adapter_accuracy"] - result["base_accuracy"] >= margin)
    return result


def evaluate_zoo(switch, suite: Suite, tasks: list[str], n: int = 200, progress: bool = True,
                 on_task=None) -> dict[str, dict]:
    """Each task's result; `on_task(task, result)` after each one (the command records it in the
    manifest at once: on two CPU cores a real-task adapter takes minutes)."""
    results = {}
    for task in tqdm(tasks, desc="zoo eval", disable=not progress):
        results[task] = evaluate_adapter(switch, suite, task, n)
        if on_task is not None:
            on_task(task, results[task])
    return results


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def markdown_table(manifest: dict, library: str = "demo") -> str:
    """The manifest's measured adapters as the docs' results table."""
    min_acc, margin = BARS.get(library, (None, 0.10))
    lines = ["| adapter | rank | targets | steps (kept) | val exact | test prompts | adapter accuracy | base accuracy | "
             "held-out wording | unseen inputs | meets bar |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in sorted(manifest["adapters"].items()):
        r, recipe = entry.get("eval"), entry.get("recipe", {})
        if r is None:
            continue
        targets = ",".join(m.replace("_proj", "") for m in recipe.get("target_modules", []))
        if recipe.get("top_layers"):
            targets += f" (last {recipe['top_layers']} layers)"
        training = entry.get("training", {})
        steps = f"{recipe.get('steps', '?')}" + (f" ({training['kept_step']})" if "kept_step" in training else "")
        kept = [c["val_exact"] for c in training.get("val_checks", []) if c["step"] == training.get("kept_step")]
        lines.append(f"| `{name}` | {recipe.get('rank', '?')} | {targets} | {steps} | {_pct(kept[0] if kept else None)} | "
                     f"{r['n_test']} | "
                     f"{_pct(r['adapter_accuracy'])} | {_pct(r['base_accuracy'])} | "
                     f"{_pct(r.get('adapter_accuracy_heldout_wording'))} | {_pct(r.get('adapter_accuracy_unseen_inputs'))} | "
                     f"{'yes' if r['meets_bar'] else '**no**'} |")
    bar = (f">= {min_acc:.0%} on the adapter's own held-out test split and " if min_acc else "on the adapter's own "
           "held-out test split, ") + f">= {100 * margin:.0f} points above the base model"
    lines += ["", f"Bar: {bar}. \"held-out wording\": test prompts phrased with instruction templates never used in "
              "training; \"unseen inputs\": inputs never seen in training (both only where the suite varies them)."]
    return "\n".join(lines)
