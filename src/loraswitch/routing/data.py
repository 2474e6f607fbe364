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


def folder_report(folder: str | Path, train: Pairs, val: Pairs, adapters: list[str]) -> list[str]:
    """What a user should hear about their router data before training on it: files left
    unread (another suffix, such as `.json`), empty files, loaded adapters with no examples (they
    get no class: routed zero-shot, or from examples, as added adapters), and prompts given for
    two adapters (each copy teaches the router a different answer)."""
    notes = []
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and path.suffix not in (".jsonl", ".txt"):
            notes.append(f"{path.name}: not read (example files are <adapter>.jsonl or <adapter>.txt)")
        elif path.is_file() and path.stem not in train and path.stem not in val:
            notes.append(f"{path.name}: no prompts in it")
    missing = [a for a in adapters if a not in train and a not in val]
    if missing:
        notes.append(f"no examples for {', '.join(missing)}: no class in this router (routed as added adapters are: "
                     "from an examples file in the adapter's folder, else zero-shot from its weights)")
    owners: dict[str, set[str]] = {}
    for pairs in (train, val):
        for name, rows in pairs.items():
            for prompt, _ in rows:
                owners.setdefault(prompt, set()).add(name)
    clashes = [p for p, names in owners.items() if len(names) > 1]
    if clashes:
        notes.append(f"{len(clashes)} prompt(s) given for more than one adapter, e.g. {clashes[0][:60]!r} "
                     f"({', '.join(sorted(owners[clashes[0]]))})")
    return notes


FEW_EXAMPLES = 5  # below this an adapter's examples are said to be few
MAX_TRAIN_PROMPT_TOKENS = 2048  # what the server answers (--max-prompt-tokens); longer ones slowed gate training 10x


def checked_folder(engine, tokenizer, folder: str | Path, train: Pairs, val: Pairs
                   ) -> tuple[Pairs, Pairs, str, list[str]]:
    """A user's router data as it will be trained on, and what to tell them before the minute of
    training (`train-router`): the prompts per adapter, then warnings: what was left unread or
    unmatched (`folder_report`) and the prompts over MAX_TRAIN_PROMPT_TOKENS, left out. Data for an
    adapter that is not loaded is a ValueError that says why (refused when loading, or no such
    adapter: a file is named after its adapter)."""
    unknown = [n for n in train if n != NONE_CLASS and n not in engine.adapters]
    if unknown:
        why = [f"{n} (refused when the library loaded: {engine.errors[n].reason})" if n in engine.errors else n
               for n in unknown]
        raise ValueError(f"example files for adapters that are not loaded: {', '.join(why)}; loaded: "
                         f"{', '.join(engine.names) or 'none'} (a file is named after its adapter, case included)")
    long = 0
    for pairs in (train, val):
        for name, rows in pairs.items():
            kept = [r for r in rows if len(tokenizer.encode(r[0], add_special_tokens=False)) <= MAX_TRAIN_PROMPT_TOKENS]
            long += len(rows) - len(kept)
            pairs[name] = kept
    counts = ", ".join(f"{n} {len(train.get(n, [])) + len(val.get(n, []))}" for n in [*engine.names, NONE_CLASS]
                       if n in train or n in val)
    notes = folder_report(folder, train, val, list(engine.names))
    if long:
        notes.append(f"{long} prompt(s) over {MAX_TRAIN_PROMPT_TOKENS} tokens left out")
    few = [n for n in engine.names if 0 < len(train.get(n, [])) + len(val.get(n, [])) < FEW_EXAMPLES]
    if few:
        notes.append(f"fewer than {FEW_EXAMPLES} examples for {', '.join(few)}: expect it to be missed on "
                     "wordings they do not show (the demo's router trains on 200 an adapter)")
    if NONE_CLASS not in train:
        notes.append("no __none__ prompts: the router will abstain only below its threshold")
    return train, val, f"examples read from {folder}: {counts}", notes


def is_validation(prompt: str) -> bool:
    """Whether `read_folder` puts `prompt` in the validation split (1 in 10, by its hash): a
    writer of router data that adds paraphrases keeps each paraphrase in its original's split."""
    return zlib.crc32(prompt.encode()) % 10 == 0


def prompts_only(pairs: Pairs) -> dict[str, list[str]]:
    return {k: [p for p, _ in v] for k, v in pairs.items()}
