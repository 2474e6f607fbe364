"""Router training data from the task suites: the demo suite's in the structure
`loraswitch.routing.data` reads from a user's example folder ({adapter or "__none__": [(prompt,
answer)]}); BIG-bench's written as such a folder, for `loraswitch train-router --data`."""

from __future__ import annotations

import json
from pathlib import Path

from loraswitch.demo.tasks import TASK_NAMES, examples, out_of_suite
from loraswitch.routing.base import NONE_CLASS
from loraswitch.routing.data import Pairs, is_validation


def demo_pairs(split: str, n_per_task: int, seed: int = 0) -> Pairs:
    """Prompts per demo task (and out-of-suite ones) from `split`, in training wording only: the
    held-out instruction templates stay unseen by router training *and* calibration, so they
    measure routing on new wording honestly."""
    data: Pairs = {t: [(e.prompt, e.answer) for e in examples(t, split, n_per_task, seed) if not e.heldout_template]
                   for t in TASK_NAMES}
    # the bundled generic prompts at their usual share (2,000 to train beside 200 a task): most are
    # near misses spread over a dozen families, which a task's share would spread too thin
    data[NONE_CLASS] = [(p, None) for p in out_of_suite(split, 10 * n_per_task, seed)]
    return data


def write_bigbench_router_data(out: Path, per_task: int = 200, seed: int = 0) -> list[Path]:
    """`<task>.jsonl` files of BIG-bench training prompts and answers (train split only: test
    prompts stay unseen by routers) in the folder format `loraswitch train-router --data` reads:
    each example as BIG-bench renders it and, where both fall in the training split, once
    reworded (`bigbench.rewording`), so the router learns the task rather than its one framing and
    no validation prompt has a twin in training (`routing.data.is_validation`)."""
    from loraswitch.demo.bigbench.rewording import reword
    from loraswitch.demo.bigbench.tasks import TASK_NAMES as BB_TASKS
    from loraswitch.demo.bigbench.tasks import examples as bb_examples

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for task in BB_TASKS:
        path = out / f"{task}.jsonl"
        exs = bb_examples(task, "train", per_task, seed=seed + 1)
        twins = [reword(ex) for ex in exs]
        pairs = [(ex, tw) for ex, tw in zip(exs, twins) if not is_validation(ex.prompt) and not is_validation(tw.prompt)]
        rows = [json.dumps({"prompt": e.prompt, "answer": e.answer}) for e in [*exs, *(tw for _, tw in pairs)]]
        path.write_text("\n".join(rows) + "\n")
        paths.append(path)
    return paths
