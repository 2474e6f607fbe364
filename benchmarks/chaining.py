"""Chained requests: a part that works on the answer of the one before it (`switch.segment`
`Part.after`, `requests.names_result`), answered on the real default and the demo library.

*Chains* ask a task and then something of its answer ("What is 25 + 17? Then spell the result
in English."): the second part should be chained to the first and answered on its answer
("forty-two"). *Independent* prompts ask two tasks, the second with its own data and often
the same tempting words ("Sort 4, 1, 3. Also, what is the answer to 12 + 30?"): nothing may be
chained, and both answers must be right. Every answer is scored with the demo suite's scorer
(exact after normalization). Prints the counts, by task pair, and every miss.

    python benchmarks/chaining.py                                       # the dev set below
    python benchmarks/chaining.py --file benchmarks/chaining_heldout.json
    python benchmarks/chaining.py --out benchmarks/results/chaining.json  # also the rows as JSON

`chaining_heldout.json` was written by a colleague who saw the task list and the format only,
not the rule nor the set below (docs/routing.md, "A part that works on the answer before it").
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

# (prompt, tasks of its two parts, their answers)
CHAINS = [
    ("What is 25 + 17? Then spell the result in English.", ["add", "num_to_english"], ["42", "forty-two"]),
    ("Add 120 and 35, then write the answer in English words.", ["add", "num_to_english"],
     ["155", "one hundred fifty-five"]),
    ("Compute 300 + 45. After that, spell out the result in English.", ["add", "num_to_english"],
     ["345", "three hundred forty-five"]),
    ("What is 8 + 9? And then write the answer in English.", ["add", "num_to_english"], ["17", "seventeen"]),
    ("Compute 30 + 12, and then write the result in French.", ["add", "num_to_french"], ["42", "quarante-deux"]),
    ("Add 19 and 18; spell the answer in French.", ["add", "num_to_french"], ["37", "trente-sept"]),
    ("What is 50 + 21? Then give the French spelling of the result.", ["add", "num_to_french"],
     ["71", "soixante et onze"]),
    ("Add 5 and 9, then add 10 to the result.", ["add", "add"], ["14", "24"]),
    ("What is 100 + 23? Then add 77 to that answer.", ["add", "add"], ["123", "200"]),
    ("Sort ascending: 9, 4, 7. Then reverse the word order of the result.", ["sort_numbers", "reverse_words"],
     ["4, 7, 9", "9, 7, 4"]),
    ("Sort these numbers: 30, 12, 88; then reverse the order of the words in the result.",
     ["sort_numbers", "reverse_words"], ["12, 30, 88", "88, 30, 12"]),
    ("Put 5, 3, 8 in increasing order, then read the result from last to first.", ["sort_numbers", "reverse_words"],
     ["3, 5, 8", "8, 5, 3"]),
    # no connective: the answer words say it
    ("What is 130 + 12? Spell the result in English.", ["add", "num_to_english"], ["142", "one hundred forty-two"]),
    ("Add 30 and 41. Write the answer in French.", ["add", "num_to_french"], ["71", "soixante et onze"]),
    ("Compute 200 + 50. Add 5 to the result.", ["add", "add"], ["250", "255"]),
    # numbered: the numbers say "next"
    ("1. What is 25 + 17?\n2. Spell the result in English.", ["add", "num_to_english"], ["42", "forty-two"]),
    ("Two steps:\n1. Add 40 and 31.\n2. Write the answer in French.", ["add", "num_to_french"],
     ["71", "soixante et onze"]),
]

INDEPENDENT = [
    ("Sort 4, 1, 3. Also, what is the answer to 12 + 30?", ["sort_numbers", "add"], ["1, 3, 4", "42"]),
    ("Add 5 and 9; then find the total of 100 and 23.", ["add", "add"], ["14", "123"]),
    ("What is 3 + 4? Then spell 58 in English.", ["add", "num_to_english"], ["7", "fifty-eight"]),
    ("Spell out 17 in French, then calculate the sum of 40 and 2.", ["num_to_french", "add"], ["dix-sept", "42"]),
    ("Add 12 and 30. Also, reverse the word order: 'the result is here'.", ["add", "reverse_words"],
     ["42", "here is result the"]),
    ("What is 7 + 8? Then write the number 21 in French.", ["add", "num_to_french"], ["15", "vingt et un"]),
]


def part_texts(tokenizer, answer) -> list[str]:
    """Each part's own answer out of an assembled one (its tokens, separators left out); the
    whole answer when the prompt was answered whole."""
    if not answer.routing.get("fan_out"):
        return [answer.text]
    ids: dict[int, list[int]] = {}
    for entry in answer.trace:
        if not entry.get("separator"):
            ids.setdefault(entry["part"], []).append(entry["token_id"])
    return [tokenizer.decode(ids.get(k, [])) for k in range(1, answer.routing["fan_out"] + 1)]


def judge(sw, items: list[tuple[str, list[str], list[str]]], chained: bool) -> list[dict]:
    """Answer every prompt through `Switch.chat` (`auto`) and score its parts."""
    from loraswitch.demo.tasks.suite import score
    from loraswitch.generate import SamplingParams

    answers = sw.chat([p for p, _, _ in items], params=SamplingParams(max_new_tokens=48))
    rows = []
    for (prompt, tasks, want), answer in zip(items, answers):
        got = part_texts(sw.base.tokenizer, answer)
        parts = answer.routing.get("parts", [])
        links = [p.get("chained_from") for p in parts]
        right = [k < len(got) and score(t, got[k], w) for k, (t, w) in enumerate(zip(tasks, want))]
        rows.append({"prompt": prompt, "pair": " -> ".join(tasks), "want": want, "got": got,
                     "adapters": answer.routing.get("adapter"), "chained_from": links,
                     "read": [p.get("read") for p in parts], "split": len(got) == 2,
                     "linked": links == [None, 1] if chained else not any(links), "right": right})
    return rows


def report(title: str, rows: list[dict]) -> None:
    n = len(rows)
    linked, first, second = (sum(r["linked"] for r in rows), sum(r["right"][0] for r in rows),
                             sum(r["right"][1] for r in rows))
    both = sum(all(r["right"]) for r in rows)
    print(f"{title}: {n} prompts; split in two {sum(r['split'] for r in rows)}, chained as asked {linked}, "
          f"first answer right {first}, second answer right {second}, both right {both}")
    pairs = Counter(r["pair"] for r in rows)
    for pair in pairs:
        mine = [r for r in rows if r["pair"] == pair]
        print(f"  {pair}: both right {sum(all(r['right']) for r in mine)} / {len(mine)}, "
              f"chained as asked {sum(r['linked'] for r in mine)} / {len(mine)}")
    for r in rows:
        if not (r["linked"] and all(r["right"])):
            print(f"  miss: {r['prompt']!r} -> {r['got']} (want {r['want']}; adapters {r['adapters']}, "
                  f"chained_from {r['chained_from']}, read {r['read']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", help="a JSON set to run instead of the built-in one "
                                   '({"chains": [{"prompt", "tasks", "answers"}], "independent": [...]})')
    ap.add_argument("--out", help="write the scored rows here as JSON")
    args = ap.parse_args()
    chains, independent = CHAINS, INDEPENDENT
    if args.file:
        data = json.loads(Path(args.file).read_text(encoding="utf-8"))
        chains, independent = ([(e["prompt"], e["tasks"], e["answers"]) for e in data[k]]
                               for k in ("chains", "independent"))
    from loraswitch.switch import Switch

    sw = Switch()
    rows = {"chains": judge(sw, chains, True), "independent": judge(sw, independent, False)}
    report("chains (the second part works on the first one's answer)", rows["chains"])
    report("independent (each part brings its own data)", rows["independent"])
    if args.out:
        Path(args.out).write_text(json.dumps({"file": args.file, **rows}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
