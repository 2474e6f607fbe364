"""Layouts of several requests beyond the numbered list and "then": does `auto` find the parts?

Segmentation only (`switch.segment`, no generation), demo library. Two kinds of prompts:

* *split*: several requests, laid out on bare lines, after an em dash or full-width punctuation,
  behind "first, ... second, ...", under headings or labels, in a list with an item that only
  says how to answer; right when exactly the wanted parts are found, each with the wanted
  adapter (None: no adapter fits, the base model answers it);
* *whole*: one request laid out over several lines or items (a format line, data given as a
  list, a heading): right when it is not cut (fewer than two parts) and the whole prompt is
  routed to the wanted adapter.

    python benchmarks/layouts.py                             # the dev set below, ~30 s on one core
    python benchmarks/layouts.py --file benchmarks/layouts_heldout.json --out F

`benchmarks/layouts_heldout.json` was written by a colleague who saw the task list only, not the
rules nor the set below (docs/routing.md has both results); `layouts_dashes.json` holds the dash
forms ("--", "―", " - ", an em dash with no spaces) and asides after a dash.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

SPLIT = [
    ("What is 25 + 17?\nReverse the word order: blue sky today", "lines", ["add", "reverse_words"]),
    ("Sort 9, 4, 7 ascending.\nWrite 21 in French words.", "lines", ["sort_numbers", "num_to_french"]),
    ("What is 25 + 17? \u2014 Spell out 13 in English.", "dash", ["add", "num_to_english"]),
    ("Add 12 and 30 \u2013 then put 5, 3, 9 in ascending order.", "dash", ["add", "sort_numbers"]),
    ("What is 25 + 17\uff1fSpell out 13 in English.", "full-width", ["add", "num_to_english"]),
    ("Sort 8, 2, 6 ascending\u3002Write 30 in French words\u3002", "full-width", ["sort_numbers", "num_to_french"]),
    ("Please help me with two things: first, what is 25 + 17; second, spell out 13 in English.", "first-second",
     ["add", "num_to_english"]),
    ("Two tasks: firstly, sort 5, 1, 3 ascending, and secondly, write 40 in French words.", "first-second",
     ["sort_numbers", "num_to_french"]),
    ("1. What is 25 + 17?\n2. Spell out 13 in English.\n3. Keep each answer short.", "list+modifier",
     ["add", "num_to_english"]),
    ("- Sort 9, 4, 7 ascending\n- Write 21 in French words\n- Answer with just the result", "list+modifier",
     ["sort_numbers", "num_to_french"]),
    ("## Task A\nWhat is 120 + 45?\n## Task B\nPositive or negative? The lamp broke in a week.", "headings",
     ["add", "sentiment"]),
    ("Q1: Add 31 and 12.\nQ2: Convert March 3, 2021 to ISO format.", "labels", ["add", "iso_date"]),
    ("Hi there!\nWhat is 25 + 17?\nWrite 21 in French words.\nThanks a lot!", "greeting lines",
     ["add", "num_to_french"]),
    ("Add 12 and 30 as well as spell out 58 in English.", "joined", ["add", "num_to_english"]),
    ("What is 25 + 17?\nTell me a joke about cats.", "lines+open", ["add", None]),
]

WHOLE = [
    ("1. What is 25 + 17?\n2. Keep the answer short.", "item modifier", "add"),
    ("Add 12 and 30.\nJust the number, please.", "line modifier", "add"),
    ("Sort these numbers ascending:\n- 9\n- 4\n- 7", "list data", "sort_numbers"),
    ("Is this review positive or negative?\nThe kettle broke after a week.\nOne star.", "lines data", "sentiment"),
    ("Positive or negative? The hotel \u2014 cheap as it was \u2014 was spotless.", "dash inside", "sentiment"),
    ("## Dates\nConvert March 3, 2021 to ISO format.", "heading", "iso_date"),
    ("- Reverse the word order: cold blue water\n- Answer in lowercase", "item modifier", "reverse_words"),
    ("Write 21 in French words\u3002Only the words, please\u3002", "full-width modifier", "num_to_french"),
]


def score(found, routed_whole, split, whole) -> dict:
    """Per layout: prompts right (see the module doc) and the misses."""
    out: dict = {"split": defaultdict(lambda: [0, 0]), "whole": defaultdict(lambda: [0, 0]), "misses": []}
    for f, (prompt, layout, want) in zip(found, split):
        got = [p.adapter for p in f.parts]
        ok = got == want
        out["split"][layout][0] += ok
        out["split"][layout][1] += 1
        if not ok:
            out["misses"].append({"prompt": prompt, "want": want, "got": [(p.text, p.adapter) for p in f.parts]})
    for f, d, (prompt, layout, want) in zip(found[len(split):], routed_whole, whole):
        ok = len(f.parts) < 2 and d.adapter == want
        out["whole"][layout][0] += ok
        out["whole"][layout][1] += 1
        if not ok:
            out["misses"].append({"prompt": prompt, "want": want, "routed": d.adapter,
                                  "got": [(p.text, p.adapter) for p in f.parts]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", help='a JSON set instead of the built-in one: {"split": [{"prompt", "layout", '
                                   '"want": [adapter or null, ...]}], "whole": [{"prompt", "layout", "want"}]}')
    ap.add_argument("--out", help="write the counts and misses here as JSON")
    args = ap.parse_args()
    split, whole = SPLIT, WHOLE
    if args.file:
        data = json.loads(Path(args.file).read_text(encoding="utf-8"))
        split, whole = ([(e["prompt"], e["layout"], e["want"]) for e in data[k]] for k in ("split", "whole"))
    from loraswitch.switch import Switch
    from loraswitch.switch.segment import segment

    sw = Switch()
    router = sw.router("auto")
    found = segment(router, sw.engine, [p for p, _, _ in split] + [p for p, _, _ in whole])
    routed_whole = router.route(sw.engine, [p for p, _, _ in whole])
    result = score(found, routed_whole, split, whole)
    for kind in ("split", "whole"):
        counts = result[kind]
        right, n = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
        print(f"{kind}: {right} / {n} right")
        for layout, (r, k) in counts.items():
            print(f"  {layout}: {r} / {k}")
    for m in result["misses"]:
        print(f"  miss: {m}")
    if args.out:
        Path(args.out).write_text(json.dumps({"file": args.file, **result}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
