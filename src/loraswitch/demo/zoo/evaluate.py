"""`loraswitch zoo eval`: measure each demo adapter, and the base model, on the adapter's own
held-out test split, and record the numbers in the manifest (the bar: >= 85% exact match and
>= 50 points above the base model)."""

from __future__ import annotations

from tqdm.auto import tqdm

from loraswitch.demo.tasks import TASKS, Example, examples
from loraswitch.generate import SamplingParams
from loraswitch.switch import Switch

BAR_ACCURACY = 0.85
BAR_MARGIN = 0.50


def answer_accuracy(switch: Switch, exs: list[Example], model: str, max_new_tokens: int = 40) -> list[bool]:
    """Exact-match correctness of `model` ("base", an adapter, or "auto") on each example."""
    gens = switch.chat([e.prompt for e in exs], model=model, params=SamplingParams(max_new_tokens=max_new_tokens))
    return [TASKS[e.task].score(g.text, e.answer) for e, g in zip(exs, gens)]


def _rate(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def evaluate_adapter(switch: Switch, task: str, n: int = 200) -> dict:
    exs = examples(task, "test", n)
    ours = answer_accuracy(switch, exs, task)
    base = answer_accuracy(switch, exs, "base")
    result = {
        "n_test": len(exs),
        "adapter_accuracy": _rate(ours),
        "base_accuracy": _rate(base),
        "adapter_accuracy_heldout_wording": _rate([ok for ok, e in zip(ours, exs) if e.heldout_template]),
    }
    if TASKS[task].finite:
        result["adapter_accuracy_unseen_inputs"] = _rate([ok for ok, e in zip(ours, exs) if not e.seen_payload])
        result["adapter_accuracy_seen_inputs_new_wording"] = _rate([ok for ok, e in zip(ours, exs) if e.seen_payload])
    result["meets_bar"] = bool(
        result["adapter_accuracy"] >= BAR_ACCURACY and result["adapter_accuracy"] - result["base_accuracy"] >= BAR_MARGIN
    )
    return result


def evaluate_zoo(switch: Switch, tasks: list[str], n: int = 200, progress: bool = True) -> dict[str, dict]:
    return {t: evaluate_adapter(switch, t, n) for t in tqdm(tasks, desc="zoo eval", disable=not progress)}


def markdown_table(manifest: dict) -> str:
    """The manifest's measured adapters as the README's results table."""

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.1f}%"

    lines = ["| adapter | rank | targets | test prompts | adapter exact match | base exact match | held-out wording | "
             "unseen inputs | meets bar |", "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in sorted(manifest["adapters"].items()):
        r, recipe = entry.get("eval"), entry.get("recipe", {})
        if r is None:
            continue
        targets = ",".join(m.replace("_proj", "") for m in recipe.get("target_modules", []))
        lines.append(f"| `{name}` | {recipe.get('rank', '?')} | {targets} | {r['n_test']} | {pct(r['adapter_accuracy'])} | "
                     f"{pct(r['base_accuracy'])} | {pct(r['adapter_accuracy_heldout_wording'])} | "
                     f"{pct(r.get('adapter_accuracy_unseen_inputs'))} | {'yes' if r['meets_bar'] else '**no**'} |")
    lines += ["", f"Bar: >= {BAR_ACCURACY:.0%} exact match on the adapter's own held-out test split and >= "
              f"{100 * BAR_MARGIN:.0f} points above the base model. \"held-out wording\": test prompts phrased with "
              "instruction templates never used in training; \"unseen inputs\": inputs never seen in training "
              "(reported for tasks with a small input space)."]
    return "\n".join(lines)
