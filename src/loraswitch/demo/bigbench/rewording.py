"""Other wordings of a BIG-bench prompt, for router training only.

Every BIG-bench task renders all its examples with one framing (its `task_prefix`, its
`choice:` lines), so a router trained on them learns the framing, not the task: on prompts of
the same tasks written another way (`benchmarks/routing_probe.py`: a story and "Which proverb
fits?", options as "(A) ... (B) ..."), the BIG-bench selector routed 21 of 50 right, most of the
rest to object_counting. The demo suite met the same thing with its instruction templates and
answered it with several wordings per task; BIG-bench has one, so the router data adds a
rewording of each training example: the task's framing dropped, kept, or replaced by an
instruction of our own, the options as `choice:` lines, inline letters or lettered lines. The
adapters are still trained and scored on BIG-bench's own rendering (`tasks.render`).
"""

from __future__ import annotations

import functools
import random
import string
import zlib

from loraswitch.demo.bigbench.fetch import load_task_file
from loraswitch.demo.bigbench.tasks import TASKS, Example

# instructions of our own per task, said the way a user might ask
INSTRUCTIONS = {
    "logical_deduction": ("Solve this ordering puzzle and pick the statement that is true.",
                          "Read the clues and decide which option must be correct.",
                          "Which of the options follows from these facts?"),
    "question_selection": ("Which question does the short answer answer, given the context?",
                           "Pick the question whose answer is the given short answer.",
                           "Given the answer and the passage, choose the question that fits."),
    "abstract_narrative_understanding": ("Which proverb best fits this story?",
                                         "Pick the saying that matches the story.",
                                         "What is the moral of this story? Choose a proverb."),
    "goal_step_wikihow": ("Which of these is a sensible step toward the goal?",
                          "Choose the step that helps get this done.",
                          "Pick the most reasonable step."),
    "winowhy": ("Is the reasoning about who the pronoun refers to correct?",
                "Does this explanation of the pronoun make sense? Say correct or incorrect.",
                "Judge the reason given for what the pronoun refers to."),
    "strategyqa": ("Answer yes or no.", "Think it through and answer yes or no:", "Quick yes/no question:"),
    "disfl_qa": ("Answer the question using the passage.",
                 "Read the context and answer the question, which corrects itself midway.",
                 "Use the text below to answer the question."),
    "linguistics_puzzles": ("Translate using the examples.",
                            "Here are translation pairs; translate the last sentence.",
                            "Work out the language from these examples and translate."),
    "object_counting": ("Count them.", "How many are there in total?", "Count carefully and give the number."),
    "epistemic_reasoning": ("Does the premise entail the hypothesis? Answer entailment or non-entailment.",
                            "Decide whether the hypothesis follows from the premise.",
                            "Entailment or non-entailment?"),
}


@functools.cache
def _framing(task: str) -> tuple[frozenset[str], frozenset[str]]:
    """The task's own prefix lines and output-prefix lines, as `render` writes them (read once:
    a task file can be megabytes)."""
    prefixes, suffixes = set(), set()
    for rel in TASKS[task].files:
        meta = load_task_file(rel)
        prefixes.add(meta.get("task_prefix", "").strip())
        suffixes.add(meta.get("example_output_prefix", "").strip())
    return frozenset(prefixes - {""}), frozenset(suffixes - {""})


def _options(choices: list[str], rng: random.Random) -> list[str]:
    """The options in one of four layouts (never numbered: "1. ..." lines read as a multi-part prompt)."""
    letters = string.ascii_uppercase
    style = rng.randrange(4) if len(choices) > 1 else rng.randrange(3)  # "Choose from: x or y" needs two
    if style == 0:
        return [f"choice: {c}" for c in choices]
    if style == 1:
        return ["Options: " + " ".join(f"({letters[i]}) {c}" for i, c in enumerate(choices))]
    if style == 2:
        return [f"{letters[i]}) {c}" for i, c in enumerate(choices)]
    return ["Choose from: " + ", ".join(choices[:-1]) + f" or {choices[-1]}"]


def reword(example: Example, salt: int = 0) -> Example:
    """`example` in another wording, the same every time for the same prompt and `salt`; never
    BIG-bench's own (a draw that keeps every part of it is drawn again)."""
    for attempt in range(8):
        out = _reworded(example, random.Random(zlib.crc32(f"reword|{salt}|{attempt}|{example.prompt}".encode())))
        if out.prompt != example.prompt:
            return out
    return out  # nothing to vary (no framing, no options, one line): the prompt as it is


def _reworded(example: Example, rng: random.Random) -> Example:
    prefixes, suffixes = _framing(example.task)
    lines = example.prompt.split("\n")
    choices = [line[len("choice: "):] for line in lines if line.startswith("choice: ")]
    body = [line for line in lines if not line.startswith("choice: ") and line not in prefixes and line not in suffixes]
    framing = rng.randrange(4)  # none, the task's own, ours before, ours after
    ours = rng.choice(INSTRUCTIONS[example.task])
    head = [ours] if framing == 2 else ([lines[0]] if framing == 1 and lines[0] in prefixes else [])
    tail = [ours] if framing == 3 else []
    text = head + body + tail + (_options(choices, rng) if choices else [])
    joiner = "\n" if rng.random() < 0.7 else " "
    return Example(example.task, joiner.join(text), example.answer, example.targets)
