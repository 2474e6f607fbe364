"""What the evaluation asks: single-task prompts from the demo suite's test split, composite
prompts of 2, 3 and 5 parts, and out-of-suite prompts (for the abstain rate).

Every prompt is an `Item`; methods answer items, scoring reads them. Composites come from
`tasks.composites` when every task is evaluated (so the sets are the suite's own); with a task
subset they are drawn the same way from the chosen tasks only, so no part needs an adapter that
is not being evaluated.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field

from loraswitch.demo.tasks import TASK_NAMES, Example, composite_prompt, composites, examples, out_of_suite

COMPOSITE_SIZES = (2, 3, 5)
TASK_SET = "task"
OOS_SET = "oos"


def composite_set(n: int) -> str:
    return f"composite-{n}"


@dataclass
class Item:
    """One prompt to answer. `task`/`answer` for single-task items; `parts` for composites;
    neither for out-of-suite prompts."""

    id: str
    set: str  # "task", "composite-N" or "oos"
    prompt: str
    max_new_tokens: int
    task: str | None = None
    answer: str | None = None
    parts: list[Example] = field(default_factory=list)
    heldout_template: bool | None = None
    seen_payload: bool | None = None

    @property
    def is_composite(self) -> bool:
        return bool(self.parts)

    def to_dict(self) -> dict:
        d = {"id": self.id, "set": self.set, "prompt": self.prompt, "task": self.task, "answer": self.answer}
        if self.parts:
            d["parts"] = [{"task": p.task, "prompt": p.prompt, "answer": p.answer} for p in self.parts]
        if self.heldout_template is not None:
            d["heldout_template"] = self.heldout_template
            d["seen_payload"] = self.seen_payload
        return d


def _composites(tasks: list[str], n_parts: int, count: int, seed: int) -> list[list[Example]]:
    if sorted(tasks) == sorted(TASK_NAMES):
        return [list(c.parts) for c in composites(n_parts, count, "test", seed)]
    pools = {t: examples(t, "test", count * n_parts, seed=seed + 7) for t in tasks}
    rng = random.Random(zlib.crc32(f"composite|{n_parts}|test|{seed}|{','.join(sorted(tasks))}".encode()))
    out = []
    for i in range(count):
        chosen = rng.sample(sorted(tasks), n_parts)
        out.append([pools[t][(i + j) % len(pools[t])] for j, t in enumerate(chosen)])
    return out


def build_items(
    tasks: list[str],
    limit: int,
    composite_sizes: tuple[int, ...] = COMPOSITE_SIZES,
    composite_limit: int | None = None,
    oos_limit: int | None = None,
    max_new_tokens: int = 40,
    part_tokens: int = 32,
    seed: int = 0,
) -> list[Item]:
    """`limit` test prompts per task, `composite_limit` (default `limit`) prompts per composite
    size that the task list allows, and `oos_limit` (default `limit`) out-of-suite prompts."""
    unknown = [t for t in tasks if t not in TASK_NAMES]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; tasks: {', '.join(TASK_NAMES)}")
    items: list[Item] = []
    for task in tasks:
        for i, ex in enumerate(examples(task, "test", limit, seed=seed)):
            items.append(Item(f"{task}/{i}", TASK_SET, ex.prompt, max_new_tokens, task, ex.answer,
                              heldout_template=ex.heldout_template, seen_payload=ex.seen_payload))
    n_comp = limit if composite_limit is None else composite_limit
    for n in composite_sizes:
        if n > len(tasks) or n_comp <= 0:
            continue
        for i, parts in enumerate(_composites(tasks, n, n_comp, seed)):
            prompt = composite_prompt([p.prompt for p in parts])
            answer = "\n".join(f"{j}. {p.answer}" for j, p in enumerate(parts, 1))
            items.append(Item(f"{composite_set(n)}/{i}", composite_set(n), prompt, part_tokens * n + 8,
                              answer=answer, parts=parts))
    n_oos = limit if oos_limit is None else oos_limit
    for i, prompt in enumerate(out_of_suite("test", n_oos, seed=seed) if n_oos > 0 else []):
        items.append(Item(f"oos/{i}", OOS_SET, prompt, max_new_tokens))
    return items
