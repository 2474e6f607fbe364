"""What the evaluation asks: single-task prompts from a suite's test split, composite prompts
of the sizes the suite defines (demo: 2, 3, 5 parts; BIG-bench: MeteoRA's composite-3, -5, -10),
and out-of-suite prompts (for the abstain rate).

Every prompt is an `Item`; methods answer items, scoring reads them. The suite (`eval.suite`)
supplies the examples and composites, so nothing here knows any task.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraswitch.eval.suite import Case, Suite

TASK_SET = "task"
OOS_SET = "oos"


def composite_set(n: int) -> str:
    return f"composite-{n}"


def freeform_set(n: int, group: str) -> str:
    """Free-form composites of n parts, in layouts the segmenter was tuned on ("train") or not
    ("heldout"): suites with a `freeform` method (the demo's, issue 13)."""
    return f"freeform-{n}-{group}"


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
    parts: list[Case] = field(default_factory=list)
    targets: tuple[str, ...] = ()
    heldout_template: bool | None = None
    seen_payload: bool | None = None

    @property
    def case(self) -> Case:
        """The single-task item as the suite's `Case` (what `Suite.score` reads)."""
        return Case(self.task or "", self.prompt, self.answer or "", self.targets, self.heldout_template, self.seen_payload)

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


def build_items(
    suite: Suite,
    tasks: list[str],
    limit: int,
    composite_sizes: tuple[int, ...] | None = None,
    composite_limit: int | None = None,
    oos_limit: int | None = None,
    max_new_tokens: int = 40,
    part_tokens: int = 32,
    seed: int = 0,
    freeform_limit: int = 0,
) -> list[Item]:
    """`limit` test prompts per task, `composite_limit` (default `limit`) prompts per composite
    size (default: the suite's) that the task list allows, `freeform_limit` free-form
    composites per layout and size (suites that have them), and `oos_limit` (default `limit`)
    out-of-suite prompts."""
    unknown = [t for t in tasks if t not in suite.task_names]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; tasks of {suite.name}: {', '.join(suite.task_names)}")
    items: list[Item] = []
    for task in tasks:
        for i, ex in enumerate(suite.examples(task, "test", limit, seed=seed)):
            items.append(Item(f"{task}/{i}", TASK_SET, ex.prompt, max_new_tokens, task, ex.answer, targets=ex.targets,
                              heldout_template=ex.heldout_template, seen_payload=ex.seen_payload))
    n_comp = limit if composite_limit is None else composite_limit
    for n in suite.composite_sizes if composite_sizes is None else composite_sizes:
        if n > len(tasks):
            continue
        for i, comp in enumerate(suite.composites(tasks, n, n_comp, seed) if n_comp > 0 else []):
            items.append(Item(f"{composite_set(n)}/{i}", composite_set(n), comp.prompt, part_tokens * n + 8,
                              answer=comp.answer, parts=list(comp.parts)))
        if freeform_limit > 0 and hasattr(suite, "freeform"):
            for i, (group, comp) in enumerate(suite.freeform(tasks, n, freeform_limit, seed)):
                items.append(Item(f"{freeform_set(n, group)}/{i}", freeform_set(n, group), comp.prompt,
                                  part_tokens * n + 8, answer=comp.answer, parts=list(comp.parts)))
    n_oos = limit if oos_limit is None else oos_limit
    for i, prompt in enumerate(suite.out_of_suite("test", n_oos, seed=seed) if n_oos > 0 else []):
        items.append(Item(f"oos/{i}", OOS_SET, prompt, max_new_tokens))
    return items
