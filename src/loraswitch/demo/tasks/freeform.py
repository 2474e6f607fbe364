"""Free-form composites: the demo's multi-task prompts written the ways people write them,
not only as the numbered list `switch.parts` first understood (issue 13).

Each composite asks `n` parts of `n` different tasks (the parts of `tasks.composites`, so the
oracle answers the same questions) in one of several layouts. The layouts are split in two:
`TRAIN_LAYOUTS` are the only ones the segmenter's settings (`switch.segment.Settings`) were
tuned on; `HELDOUT_LAYOUTS` use other markers, connectives and block styles and were never
looked at while tuning, so their score says whether the mechanism holds on layouts it was not
developed on. The eval reports the two groups apart.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from loraswitch.demo.tasks.suite import COMPOSITE_HEADER, Example, composites, examples
from loraswitch.numbered import numbered

Layout = Callable[[list[Example], random.Random], str]


@dataclass(frozen=True)
class FreeComposite:
    prompt: str
    parts: tuple[Example, ...]
    layout: str
    heldout: bool


def _lower(e: Example) -> str:
    """The part's prompt with its first letter lowered, for use mid-sentence (not when the
    prompt starts with its input: "Anna is 34 ..." keeps its capital)."""
    p = e.prompt
    if p.startswith(e.payload.split(" | ")[0]) or not p[:1].isalpha() or p[1:2].isupper():
        return p
    return p[0].lower() + p[1:]


def _prose(parts: list[Example], rng: random.Random, links: list[tuple[str, str]], opener: str = "") -> str:
    """Parts joined into running text: each link is (after a statement, after a question)."""
    text = opener + (_lower(parts[0]) if opener else parts[0].prompt)
    for e in parts[1:]:
        after_statement, after_question = rng.choice(links)
        prev = text.rstrip()
        if prev.endswith("?"):
            text = prev + after_question + (_lower(e) if after_question[-2:-1] == "," else e.prompt)
        else:
            text = prev.rstrip(".") + after_statement + (e.prompt if after_statement.rstrip().endswith(".") else _lower(e))
    return text


# ---------------------------------------------------------------- layouts tuned on
def numbered_list(parts, rng):
    return numbered([p.prompt for p in parts], header=COMPOSITE_HEADER)


def bullets(parts, rng):
    head = rng.choice(["Please do the following:", "A few things:", "Can you help with these?"])
    return head + "\n" + "\n".join(f"- {p.prompt}" for p in parts)


def prose_then(parts, rng):
    return _prose(parts, rng, [(", and then ", " And then, "), (". Also, ", " Also, "), (". Then ", " Then ")])


def inst_blocks(parts, rng):
    return "\n".join(f"[INST] {p.prompt} [/INST]" for p in parts)


# ---------------------------------------------------------------- held-out layouts
def letters(parts, rng):
    items = [f"{chr(97 + k)}) {p.prompt}" for k, p in enumerate(parts)]
    return "\n".join(items) if rng.random() < 0.5 else " ".join(items)


def tagged(parts, rng):
    tag = rng.choice(["q", "task", "question"])
    return "\n".join(f"<{tag}>{p.prompt}</{tag}>" for p in parts)


def paragraphs(parts, rng):
    head = rng.choice(["Hi! I have a few requests today.", "Hello there.", "Good morning, some quick ones for you."])
    tail = rng.choice(["Thanks a lot!", "Thank you.", ""])
    return "\n\n".join([head, *[p.prompt for p in parts], *([tail] if tail else [])])


def prose_sequence(parts, rng):
    return _prose(parts, rng, [("; ", " "), (". After that, ", " After that, "), (". Next, ", " Next, "),
                               (", and finally ", " Finally, ")], opener="First, ")


def few_shot(parts, rng):
    """MeteoRA's composite format on the demo tasks: a worked example (questions of the same
    tasks from train, then their numbered answers), then the questions."""
    shots = [rng.choice(examples(p.task, "train", 20, seed=3)) for p in parts]
    blocks = "\n".join(f"[INST] {s.prompt} [/INST]" for s in shots)
    answers = numbered([s.answer for s in shots])
    asked = "\n".join(f"[INST] {p.prompt} [/INST]" for p in parts)
    return ("Each bracketed block is a separate question. Answer them in order as a numbered list.\n\n"
            f"Example:\n{blocks}\n{answers}\n\nNow answer the following questions in the same way.\n{asked}")


TRAIN_LAYOUTS: dict[str, Layout] = {"numbered": numbered_list, "bullets": bullets, "prose_then": prose_then,
                                    "inst": inst_blocks}
HELDOUT_LAYOUTS: dict[str, Layout] = {"letters": letters, "tagged": tagged, "paragraphs": paragraphs,
                                      "prose_sequence": prose_sequence, "few_shot": few_shot}


def freeform(n_parts: int, count: int, heldout: bool, split: str = "test", seed: int = 0,
             tasks: tuple[str, ...] | list[str] | None = None) -> list[FreeComposite]:
    """`count` composites of `n_parts` parts per layout of the group (held-out or training),
    the parts drawn as `tasks.composites` draws them."""
    layouts = HELDOUT_LAYOUTS if heldout else TRAIN_LAYOUTS
    out = []
    for k, (name, layout) in enumerate(layouts.items()):
        rng = random.Random(zlib.crc32(f"freeform|{name}|{n_parts}|{split}|{seed}".encode()))
        for c in composites(n_parts, count, split, seed + 101 * (k + 1) + 1009 * heldout, tasks=tasks):
            out.append(FreeComposite(layout(list(c.parts), rng), c.parts, name, heldout))
    return out
