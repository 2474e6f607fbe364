"""Training data for the learned routers: prompts per adapter from a user's folder of example
files (the demo builds the same structure from its own task suite: `loraswitch.demo.router_data`).

Folder format: one file per adapter, named after it: `<adapter>.jsonl` (one JSON object per
line with a "prompt" field; an optional "answer" field is used by gate training) or `<adapter>.txt`
(one prompt per line). An optional `__none__.txt` / `__none__.jsonl` holds prompts no adapter
should take, added to the bundled generic prompts (`routing.generic`: open requests and near
misses). `bundled=False` (`train-router --no-bundled-none`) leaves the bundled ones out, for a
library one of whose adapters does what a bundled near-miss family asks: a user's five-line
`__none__.txt` used to replace all 2,000 of them, and a router trained so sent "What is the
capital of France?" to an addition adapter. Prompts are split 90/10 into train and validation by
hashing the prompt text.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from loraswitch.library import read_examples
from loraswitch.routing.base import NONE_CLASS
from loraswitch.routing.generic import BUNDLED_TRAIN, BUNDLED_VAL, generic_prompts

Pairs = dict[str, list[tuple[str, str | None]]]  # adapter -> [(prompt, answer or None)]


def read_folder(folder: str | Path, bundled: bool = True) -> tuple[Pairs, Pairs]:
    """(train, val) pairs from a folder of per-adapter example files, with the bundled
    `__none__` prompts added unless `bundled` is False (the module doc)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"router data folder {folder} does not exist")
    train: Pairs = {}
    val: Pairs = {}
    for path in sorted(folder.iterdir()):
        if path.suffix not in (".jsonl", ".txt"):
            continue
        rows = read_examples(path)
        for prompt, answer in rows:
            target = val if is_validation(prompt) else train
            target.setdefault(path.stem, []).append((prompt, answer))
    if not train:
        raise ValueError(f"{folder} has no <adapter>.jsonl or <adapter>.txt example files")
    if bundled:
        train.setdefault(NONE_CLASS, []).extend((p, None) for p in generic_prompts("train", BUNDLED_TRAIN))
        val.setdefault(NONE_CLASS, []).extend((p, None) for p in generic_prompts("val", BUNDLED_VAL))
    return train, val


def is_validation(prompt: str) -> bool:
    """Whether `read_folder` puts `prompt` in the validation split (1 in 10, by its hash): a
    writer of router data that adds paraphrases keeps each paraphrase in its original's split."""
    return zlib.crc32(prompt.encode()) % 10 == 0


def prompts_only(pairs: Pairs) -> dict[str, list[str]]:
    return {k: [p for p, _ in v] for k, v in pairs.items()}
