"""The ten BIG-bench tasks (../shared/spec/real-tasks.md): which files, how a prompt is rendered,
and the seeded train / val / test splits.

A prompt is rendered the way MeteoRA renders BIG-bench: the task's own framing from its JSON
(`task_prefix`, `example_input_prefix`, `example_output_prefix`, where the task defines them; they
say what is asked, e.g. winowhy's "The above reasoning is"), the input, then for multiple-choice
tasks one `choice: <option>` line per option in a seeded shuffled order. The answer to train on
and score is the correct option's text (strategyqa: "Yes"/"No" from its target_scores, not the
explanation in its `target`), or for generative tasks the first listed target (any listed target
scores).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from loraswitch.demo.bigbench.fetch import FILES, HELDOUT_FILES, ensure, heldout_dir, load_task_file, require

SPLITS = ("train", "val", "test")
TEST_N = 200
VAL_N = 100
# ~4 characters per token on this tokenizer: 1,500 characters keep prompts under ~450 tokens, the
# length the trainer's batches and composite-10 prompts can afford on CPU. Longer examples (a
# part of disfl_qa and question_selection, whose inputs carry a whole Wikipedia paragraph) are
# skipped before splitting; `loraswitch data bigbench` reports how many.
MAX_PROMPT_CHARS = 1500


@dataclass(frozen=True)
class BBTask:
    name: str
    files: tuple[str, ...]
    choice: bool  # multiple choice (scored on the chosen option) or generative (exact match)
    note: str = ""  # which subtask and why


TASKS: dict[str, BBTask] = {t.name: t for t in [
    BBTask("logical_deduction", ("logical_deduction/three_objects/task.json", "logical_deduction/five_objects/task.json",
                                 "logical_deduction/seven_objects/task.json"), True,
           "all three subtasks merged (1,500 examples), as the HF BIG-bench config MeteoRA trained from merges them"),
    BBTask("question_selection", ("question_selection/task.json",), True),
    BBTask("abstract_narrative_understanding", ("abstract_narrative_understanding/4_distractors/task.json",), True,
           "4_distractors: five options keep prompts short; 9/99 distractors would triple the prompt"),
    BBTask("goal_step_wikihow", ("goal_step_wikihow/step_inference/task.json",), True,
           "step_inference: the largest subtask (2,250), four short options; step_ordering is a two-way "
           "ordering question of a different shape"),
    BBTask("winowhy", ("winowhy/task.json",), True),
    BBTask("strategyqa", ("strategyqa/task.json",), True, "answer Yes/No from target_scores; the explanation is not trained"),
    BBTask("disfl_qa", ("disfl_qa/task.json",), False),
    BBTask("linguistics_puzzles", ("linguistics_puzzles/task.json",), False),
    BBTask("object_counting", ("object_counting/task.json",), False, "trained on the number word, scores word or digits"),
    BBTask("epistemic_reasoning", ("epistemic_reasoning/task.json",), True),
]}
TASK_NAMES = tuple(TASKS)
assert all(f in FILES for t in TASKS.values() for f in t.files)


@dataclass(frozen=True)
class Example:
    """One rendered prompt, the answer to train on, and every answer that scores."""

    task: str
    prompt: str
    answer: str
    targets: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"task": self.task, "prompt": self.prompt, "answer": self.answer, "targets": list(self.targets)}


def render(task: str, meta: dict, example: dict, choice: bool | None = None) -> Example:
    """One BIG-bench example as a prompt; options shuffled by a seed drawn from the input, so the
    same input always renders the same prompt. `choice`: multiple choice (default: the task's)."""
    lines = [meta.get("task_prefix", "").strip()]
    in_prefix, text = meta.get("example_input_prefix", "").strip(), str(example["input"]).strip()
    lines.append(f"{in_prefix} {text}" if in_prefix else text)
    lines.append(meta.get("example_output_prefix", "").strip())
    scores = example.get("target_scores")
    if (TASKS[task].choice if choice is None else choice) and scores:
        options = list(scores)
        random.Random(zlib.crc32(f"{task}|{text}".encode())).shuffle(options)
        lines += [f"choice: {o}" for o in options]
        answer = max(scores, key=lambda o: scores[o])
        targets = (answer,)
    else:
        target = example["target"]
        targets = tuple(str(t) for t in target) if isinstance(target, list) else (str(target),)
        answer = targets[0]
    return Example(task, "\n".join(line for line in lines if line), answer, targets)


def rendered(task: str, root: Path | None = None) -> tuple[list[Example], int, int]:
    """Every usable example of `task` in file order, and how many were dropped as duplicate
    prompts and as over-long."""
    out: dict[str, Example] = {}
    dupes = too_long = 0
    for rel in TASKS[task].files:
        data = load_task_file(rel, root)
        for raw in data["examples"]:
            ex = render(task, data, raw)
            if len(ex.prompt) > MAX_PROMPT_CHARS:
                too_long += 1
            elif ex.prompt in out:
                dupes += 1
            else:
                out[ex.prompt] = ex
    return list(out.values()), dupes, too_long


def heldout_examples(n: int, sdist: Path | None = None) -> list[Example]:
    """`n` test prompts of each held-out task (`fetch.HELDOUT_FILES`: tasks nothing here was
    trained or tuned on), rendered like the library's; fetched into the cache on first use."""
    root = ensure(sdist, heldout_dir(), HELDOUT_FILES)
    out = []
    for rel in HELDOUT_FILES:
        task, data = rel.split("/")[0], load_task_file(rel, root)
        exs = [render(task, data, raw, choice="target_scores" in raw) for raw in data["examples"]]
        exs = [e for e in exs if len(e.prompt) <= MAX_PROMPT_CHARS]
        random.Random(zlib.crc32(f"heldout|{task}".encode())).shuffle(exs)
        out += exs[:n]
    return out


@cache
def _verified() -> Path:
    return require()


@cache
def splits(task: str, root: Path | None = None) -> dict[str, tuple[Example, ...]]:
    """Disjoint splits of `task`: a shuffle seeded by the task name, test first, then val."""
    if task not in TASKS:
        raise ValueError(f"unknown BIG-bench task {task!r}; tasks: {', '.join(TASK_NAMES)}")
    exs, _, _ = rendered(task, _verified() if root is None else root)
    random.Random(zlib.crc32(f"split|{task}".encode())).shuffle(exs)
    return {"test": tuple(exs[:TEST_N]), "val": tuple(exs[TEST_N:TEST_N + VAL_N]), "train": tuple(exs[TEST_N + VAL_N:])}


def examples(task: str, split: str, n: int | None = None, seed: int = 0, root: Path | None = None) -> list[Example]:
    """The first `n` examples of `task`'s `split` (all if None); `seed` > 0 reshuffles them."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    exs = list(splits(task, root)[split])
    if seed:
        random.Random(zlib.crc32(f"{task}|{split}|{seed}".encode())).shuffle(exs)
    return exs if n is None else exs[:n]
