"""MeteoRA's composite-n prompts on our BIG-bench splits.

MeteoRA's composite sets, in its order: composite-3 = logical_deduction, question_selection,
strategyqa; composite-5 adds abstract_narrative_understanding, goal_step_wikihow; composite-10
adds winowhy, disfl_qa, linguistics_puzzles and (in place of its two non-BIG-bench tasks)
object_counting and epistemic_reasoning.

One prompt: a short instruction, two worked examples (each n `[INST] question [/INST]` blocks,
one per task in the set's order, then the numbered answers), a line asking to answer the next
questions the same way, and n new `[INST] ... [/INST]` blocks. Worked examples come from train,
questions from test. To keep composite-10 prompts within what CPU generation can afford, worked
examples are drawn from each task's shortest training prompts and questions skip test prompts
over `MAX_PART_CHARS`.
"""

from __future__ import annotations

import random
import zlib

from loraswitch.demo.bigbench.tasks import Example, examples

COMPOSITE_SETS: dict[int, tuple[str, ...]] = {
    3: ("logical_deduction", "question_selection", "strategyqa"),
    5: ("logical_deduction", "question_selection", "strategyqa", "abstract_narrative_understanding",
        "goal_step_wikihow"),
    10: ("logical_deduction", "question_selection", "strategyqa", "abstract_narrative_understanding",
         "goal_step_wikihow", "winowhy", "disfl_qa", "linguistics_puzzles", "object_counting", "epistemic_reasoning"),
}
INSTRUCTION = ("Each bracketed block below is a separate question. Answer every question, in order, as a numbered list "
               "with one short answer per line.")
FOLLOW_UP = "Now answer the following questions in the same way."
MAX_PART_CHARS = 1000
SHOT_POOL = 40  # worked examples come from each task's 40 shortest training prompts


def inst(prompt: str) -> str:
    return f"[INST] {prompt} [/INST]"


def composite_prompt(shots: list[list[Example]], questions: list[Example]) -> str:
    """The MeteoRA-format prompt for `questions`, after the worked examples `shots`."""
    blocks = [INSTRUCTION]
    for k, shot in enumerate(shots, 1):
        blocks.append(f"Example {k}:\n" + "\n".join(inst(e.prompt) for e in shot) + "\n"
                      + "\n".join(f"{i}. {e.answer}" for i, e in enumerate(shot, 1)))
    blocks.append(FOLLOW_UP + "\n" + "\n".join(inst(e.prompt) for e in questions))
    return "\n\n".join(blocks)


def composite_parts(n_parts: int, count: int, seed: int = 0, n_shots: int = 2) -> list[tuple[str, list[Example]]]:
    """`count` composite-`n_parts` prompts with their question examples, MeteoRA's task set."""
    tasks = COMPOSITE_SETS.get(n_parts)
    if tasks is None:
        raise ValueError(f"MeteoRA defines composite-3, -5 and -10, not composite-{n_parts}")
    rng = random.Random(zlib.crc32(f"bb-composite|{n_parts}|{seed}".encode()))
    questions = {t: [e for e in examples(t, "test", seed=seed) if len(e.prompt) <= MAX_PART_CHARS] for t in tasks}
    shot_pool = {t: sorted(examples(t, "train"), key=lambda e: len(e.prompt))[:SHOT_POOL] for t in tasks}
    out = []
    for i in range(min(count, min(len(q) for q in questions.values()))):
        shots = [[rng.choice(shot_pool[t]) for t in tasks] for _ in range(n_shots)]
        parts = [questions[t][i] for t in tasks]
        out.append((composite_prompt(shots, parts), parts))
    return out
