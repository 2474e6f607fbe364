"""What the evaluation needs from a task suite, so the harness never imports one.

A suite names its tasks, hands out examples per split, scores an output against an example,
builds composite prompts (several tasks in one prompt) and reads their answers back part by part,
and supplies out-of-suite prompts (for the abstain rate). The synthetic demo suite and the
BIG-bench suite implement it under `loraswitch.demo`; the `eval` command passes one in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from loraswitch.numbered import numbered


@dataclass(frozen=True)
class Case:
    """One prompt of one task and its answer. `targets`: every answer that scores, where a task
    accepts more than one; `heldout_template` / `seen_payload`: whether the wording / the input
    could have been seen in training (None where a suite does not vary its wording)."""

    task: str
    prompt: str
    answer: str
    targets: tuple[str, ...] = ()
    heldout_template: bool | None = None
    seen_payload: bool | None = None


@dataclass(frozen=True)
class CompositeCase:
    """A prompt that asks `parts` (one case per task) at once; the answer lists them numbered."""

    prompt: str
    parts: tuple[Case, ...]

    @property
    def answer(self) -> str:
        return numbered([p.answer for p in self.parts])


class Suite(Protocol):
    name: str
    task_names: tuple[str, ...]
    composite_sizes: tuple[int, ...]  # the composite-n sets the suite defines by default

    def examples(self, task: str, split: str, n: int, seed: int = 0) -> list[Case]:
        """Up to `n` cases of `task` from `split` ("train", "val" or "test")."""
        ...

    def score(self, case: Case, output: str) -> bool:
        """Whether `output` answers `case` correctly (the task's own metric)."""
        ...

    def composites(self, tasks: list[str], n_parts: int, count: int, seed: int = 0) -> list[CompositeCase]:
        """Up to `count` composite prompts of `n_parts` parts from `tasks`' test splits (none when
        `tasks` cannot form one)."""
        ...

    def parse_parts(self, output: str, n_parts: int) -> list[str]:
        """A composite answer split into its `n_parts` parts ("" for a missing part)."""
        ...

    def out_of_suite(self, split: str, n: int, seed: int = 0) -> list[str]:
        """Prompts no adapter of the suite is for."""
        ...
