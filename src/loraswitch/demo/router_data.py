"""Router training data from the demo suite, in the structure `loraswitch.routing.data` reads
from a user's example folder: {adapter or "__none__": [(prompt, answer)]}."""

from __future__ import annotations

from loraswitch.demo.tasks import TASK_NAMES, examples, out_of_suite
from loraswitch.routing.base import NONE_CLASS
from loraswitch.routing.data import Pairs


def demo_pairs(split: str, n_per_task: int, seed: int = 0) -> Pairs:
    """Prompts per demo task (and out-of-suite ones) from `split`, in training wording only: the
    held-out instruction templates stay unseen by router training *and* calibration, so they
    measure routing on new wording honestly."""
    data: Pairs = {t: [(e.prompt, e.answer) for e in examples(t, split, n_per_task, seed) if not e.heldout_template]
                   for t in TASK_NAMES}
    data[NONE_CLASS] = [(p, None) for p in out_of_suite(split, n_per_task, seed)]
    return data
