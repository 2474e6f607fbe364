"""Training data for the learned routers: prompts per adapter, from the demo suite or from a
user's folder of example files.

Folder format: one file per adapter, named after it: `<adapter>.jsonl` (one JSON object per
line with a "prompt" field; an optional "answer" field is used by gate training) or `<adapter>.txt`
(one prompt per line). An optional `__none__.txt` / `__none__.jsonl` holds prompts no adapter
should take; without it the bundled generic out-of-suite prompts are used. Prompts are split
90/10 into train and validation by hashing the prompt text.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from loraswitch.demo.tasks import TASK_NAMES, examples, out_of_suite
from loraswitch.routing.seq import NONE_CLASS

Pairs = dict[str, list[tuple[str, str | None]]]  # adapter -> [(prompt, answer or None)]


def demo_pairs(split: str, n_per_task: int, seed: int = 0) -> Pairs:
    """Prompts per demo task (and out-of-suite ones) from `split`, in training wording only: the
    held-out instruction templates stay unseen by router training *and* calibration, so they
    measure routing on new wording honestly."""
    data: Pairs = {t: [(e.prompt, e.answer) for e in examples(t, split, n_per_task, seed) if not e.heldout_template]
                   for t in TASK_NAMES}
    data[NONE_CLASS] = [(p, None) for p in out_of_suite(split, n_per_task, seed)]
    return data


def read_folder(folder: str | Path) -> tuple[Pairs, Pairs]:
    """(train, val) pairs from a folder of per-adapter example files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"router data folder {folder} does not exist")
    train: Pairs = {}
    val: Pairs = {}
    for path in sorted(folder.iterdir()):
        if path.suffix not in (".jsonl", ".txt"):
            continue
        rows: list[tuple[str, str | None]] = []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix == ".txt":
                rows.append((line.strip(), None))
                continue
            try:
                obj = json.loads(line)
                rows.append((str(obj["prompt"]), obj.get("answer")))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'prompt' field ({exc})") from exc
        for prompt, answer in rows:
            target = val if zlib.crc32(prompt.encode()) % 10 == 0 else train
            target.setdefault(path.stem, []).append((prompt, answer))
    if not train:
        raise ValueError(f"{folder} has no <adapter>.jsonl or <adapter>.txt example files")
    if NONE_CLASS not in train:
        train[NONE_CLASS] = [(p, None) for p in out_of_suite("train", 300)]
        val[NONE_CLASS] = [(p, None) for p in out_of_suite("val", 60)]
    return train, val


def prompts_only(pairs: Pairs) -> dict[str, list[str]]:
    return {k: [p for p, _ in v] for k, v in pairs.items()}
