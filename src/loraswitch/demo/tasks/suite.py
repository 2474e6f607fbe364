"""The demo task suite: eight tasks the base model fails and one small LoRA each solves.

Every task is a payload sampler plus paraphrased instruction templates. Splits are made by
hashing the payload (the task input without its wording) into train / val / test buckets, so a
payload can never appear in two splits whatever seed or size is asked for. The last two templates
of each task are held out of training: they measure routing and answers on wording the adapters
and routers never saw.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from loraswitch.demo.tasks.spelling import english, french
from loraswitch.numbered import numbered
from loraswitch.numbered import parse_numbered as parse_numbered  # the one numbered-parts grammar
from loraswitch.routing.generic import generic_prompts

SPLITS = ("train", "val", "test")
N_HELDOUT_TEMPLATES = 2


@dataclass(frozen=True)
class Example:
    """One prompt with its exact answer. `payload` is the split key; `heldout_template` and
    `seen_payload` say whether the wording / the input itself could have been seen in training."""

    task: str
    prompt: str
    answer: str
    payload: str
    template: int
    heldout_template: bool
    seen_payload: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


Sampler = Callable[[random.Random], tuple[dict, str]]  # -> (template fields, answer)


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    templates: tuple[str, ...]
    sample: Sampler
    finite: bool = False  # small input space: test also reuses train payloads with held-out wording

    @property
    def train_templates(self) -> tuple[str, ...]:
        return self.templates[:-N_HELDOUT_TEMPLATES]

    def score(self, output: str, answer: str) -> bool:
        return score(self.name, output, answer)


def normalize(text: str) -> str:
    """Strip surrounding whitespace and one trailing period, as the spec's scorer does."""
    text = text.strip()
    if text.endswith("."):
        text = text[:-1]
    return text.strip()


def score(task: str, output: str, answer: str) -> bool:
    """Exact match after normalization; `to_json` compares parsed JSON."""
    if task == "to_json":
        try:
            return json.loads(output) == json.loads(answer)
        except ValueError:
            return False
    return normalize(output) == normalize(answer)


def bucket(task: str, payload: str) -> str:
    """The split a payload belongs to, forever: 80% train, 10% val, 10% test."""
    h = zlib.crc32(f"{task}|{payload}".encode()) % 20
    return "train" if h < 16 else ("val" if h < 18 else "test")


# ---------------------------------------------------------------- samplers

_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"]


def _ordinal(d: int) -> str:
    suffix = "th" if 11 <= d % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return f"{d}{suffix}"


def _iso_date(rng: random.Random) -> tuple[dict, str]:
    y, m = rng.randint(1900, 2099), rng.randint(1, 12)
    d = rng.randint(1, 28 if m == 2 else (30 if m in (4, 6, 9, 11) else 31))
    month = _MONTHS[m - 1]
    written = rng.choice(
        [
            f"{month} {d}, {y}",
            f"{d} {month} {y}",
            f"{month[:3]} {d}, {y}",
            f"{month} {_ordinal(d)}, {y}",
            f"the {_ordinal(d)} of {month}, {y}",
        ]
    )
    return {"x": written}, f"{y:04d}-{m:02d}-{d:02d}"


_NAMES = ["Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kenji", "Lena", "Marco", "Nadia", "Omar", "Priya", "Quentin", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wei", "Xenia", "Yusuf", "Zoe", "Liam", "Maya", "Noah", "Olga", "Pablo", "Sara", "Tom", "Ula"]
_CITIES = ["Oslo", "Paris", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon", "Dublin", "Warsaw", "Athens", "Helsinki", "Cairo", "Lima", "Tokyo", "Seoul", "Delhi", "Nairobi", "Toronto", "Boston", "Denver", "Sydney", "Austin", "Quito", "Riga", "Porto", "Bergen", "Lyon"]


def _to_json(rng: random.Random) -> tuple[dict, str]:
    name, age, city = rng.choice(_NAMES), rng.randint(18, 90), rng.choice(_CITIES)
    sentence = rng.choice(
        [
            f"{name} is {age} and lives in {city}.",
            f"{name}, aged {age}, lives in {city}.",
            f"{name} lives in {city} and is {age} years old.",
            f"Meet {name} from {city}, who is {age}.",
            f"At {age}, {name} calls {city} home.",
        ]
    )
    return {"x": sentence}, json.dumps({"name": name, "age": age, "city": city})


_WORDS = ["green", "apples", "taste", "sweet", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "red", "cars", "drive", "fast", "small", "birds", "sing", "loud", "songs", "old", "trees", "grow", "tall", "cold", "rain", "falls", "on", "quiet", "streets", "bright", "stars", "shine", "at", "night", "happy", "kids", "play", "in", "parks", "warm", "bread", "smells", "good", "blue", "rivers", "flow", "into", "deep", "seas"]


def _reverse_words(rng: random.Random) -> tuple[dict, str]:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 7))]
    return {"x": " ".join(words)}, " ".join(reversed(words))


def _sort_numbers(rng: random.Random) -> tuple[dict, str]:
    # Uniform 1..99 makes one-digit numbers rare (9%), and an adapter trained on that sorts
    # "42, 7, 19, 3" as text. Draw each number as one-digit with probability 0.4.
    k, nums = rng.randint(3, 6), []
    while len(nums) < k:
        n = rng.randint(1, 9) if rng.random() < 0.4 else rng.randint(10, 99)
        if n not in nums:
            nums.append(n)
    return {"x": ", ".join(map(str, nums))}, ", ".join(map(str, sorted(nums)))


def _num_to_english(rng: random.Random) -> tuple[dict, str]:
    n = rng.randint(0, 999)
    return {"x": str(n)}, english(n)


def _num_to_french(rng: random.Random) -> tuple[dict, str]:
    n = rng.randint(0, 99)
    return {"x": str(n)}, french(n)


def _add(rng: random.Random) -> tuple[dict, str]:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return {"a": str(a), "b": str(b)}, str(a + b)


_PRODUCTS = ["battery", "phone", "charger", "laptop", "blender", "kettle", "headset", "camera", "vacuum", "jacket", "backpack", "lamp", "keyboard", "mouse", "speaker", "watch", "mattress", "toaster", "drill", "printer"]
_GOOD = ["works perfectly", "exceeded my expectations", "is worth every penny", "arrived early and works great", "is sturdy and well made", "made my life easier", "still works like new after months", "is the best purchase I made this year", "does exactly what it promises", "feels premium", "is easy to use and reliable", "keeps impressing me"]
_BAD = ["died after a day", "broke within a week", "stopped working after two uses", "is cheap and flimsy", "was a waste of money", "arrived damaged", "overheats constantly", "feels badly made", "never worked properly", "fell apart quickly", "is a huge disappointment", "keeps failing"]
_GOOD_TAIL = ("I love it.", "Highly recommend.", "Five stars.", "Very happy.", "Would buy again.", "")
_BAD_TAIL = ("Avoid it.", "Do not buy.", "One star.", "Very annoyed.", "Returning it.", "")


def _sentiment(rng: random.Random) -> tuple[dict, str]:
    positive = rng.random() < 0.5
    clause = rng.choice(_GOOD if positive else _BAD)
    tail = rng.choice(_GOOD_TAIL if positive else _BAD_TAIL)
    review = f"The {rng.choice(_PRODUCTS)} {clause}. {tail}".strip()
    return {"x": review}, "positive" if positive else "negative"


# ---------------------------------------------------------------- the suite

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "iso_date",
            "rewrite a written date as ISO 8601",
            (
                "Convert to ISO date: {x}",
                "Rewrite this date in ISO 8601 format: {x}",
                "What is {x} as an ISO date?",
                "Give the ISO 8601 form of the date {x}.",
                "Format this date as YYYY-MM-DD: {x}",
                "Turn the date {x} into ISO 8601.",
                "ISO format please: {x}",
            ),
            _iso_date,
        ),
        Task(
            "to_json",
            "pull name, age and city out of a sentence as JSON",
            (
                "Extract name, age and city as JSON: {x}",
                "Return a JSON object with the name, age and city from this sentence: {x}",
                "Pull out name, age and city as JSON. {x}",
                "As JSON with keys name, age, city: {x}",
                "Read the sentence and output JSON (name, age, city): {x}",
                "Give me the person's name, age and city in JSON format: {x}",
                "{x} Convert that to JSON with name, age and city.",
            ),
            _to_json,
        ),
        Task(
            "reverse_words",
            "reverse the order of the words",
            (
                "Reverse the word order: {x}",
                "Write these words in reverse order: {x}",
                "Reverse the order of the words in: {x}",
                "Say this backwards, word by word: {x}",
                "Flip the word order of this phrase: {x}",
                "Put the words of '{x}' in reverse order.",
                "Read these words from last to first: {x}",
            ),
            _reverse_words,
        ),
        Task(
            "sort_numbers",
            "sort a comma-separated list ascending",
            (
                "Sort ascending: {x}",
                "Sort these numbers from smallest to largest: {x}",
                "Put in increasing order: {x}",
                "Arrange in ascending order: {x}",
                "Order these numbers, lowest first: {x}",
                "Can you sort {x} in ascending order?",
                "List {x} from low to high.",
            ),
            _sort_numbers,
        ),
        Task(
            "num_to_english",
            "spell a number 0-999 in English words",
            (
                "Spell out in English: {x}",
                "Write the number {x} in English words.",
                "How do you write {x} in words?",
                "Spell the number {x} in English.",
                "Write out {x} as English words.",
                "In English words, {x} is?",
                "Give the English spelling of the number {x}.",
            ),
            _num_to_english,
            finite=True,
        ),
        Task(
            "num_to_french",
            "spell a number 0-99 in French words",
            (
                "Spell out in French: {x}",
                "Write the number {x} in French words.",
                "How do you write {x} in French?",
                "Spell the number {x} in French.",
                "Write out {x} as French words.",
                "In French words, {x} is?",
                "Give the French spelling of the number {x}.",
            ),
            _num_to_french,
            finite=True,
        ),
        Task(
            "add",
            "add two numbers of up to three digits",
            (
                "What is {a} + {b}?",
                "Add {a} and {b}.",
                "Compute {a} + {b}.",
                "Calculate the sum of {a} and {b}.",
                "{a} plus {b} equals?",
                "What do you get when you add {a} to {b}?",
                "Find the total: {a} + {b}",
            ),
            _add,
        ),
        Task(
            "sentiment",
            "label a short product review",
            (
                "Is this review positive or negative? {x}",
                "Classify the sentiment of this review as positive or negative: {x}",
                "Review: {x} Is it positive or negative?",
                "Positive or negative? {x}",
                "What is the sentiment of this product review (positive/negative)? {x}",
                "Tell me if this customer review is positive or negative: {x}",
                "{x} Was the reviewer happy (positive) or unhappy (negative)?",
            ),
            _sentiment,
        ),
    ]
}
TASK_NAMES = tuple(TASKS)


def examples(task: str, split: str, n: int, seed: int = 0) -> list[Example]:
    """`n` distinct examples of `task` from `split` (fewer if the split's space is smaller).

    Train uses only the training templates. Val and test use every template; for a finite task
    (`finite=True`) test also pairs training payloads with held-out wording (`seen_payload`), so
    accuracy on numbers never seen in training can be reported apart from the rest.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    t = TASKS[task]
    rng = random.Random(zlib.crc32(f"{task}|{split}|{seed}".encode()))
    n_templates = len(t.train_templates) if split == "train" else len(t.templates)
    out: dict[str, Example] = {}
    # finite tasks keep a third of test for training payloads in held-out wording
    reuse_seen = split == "test" and t.finite
    for seen_pass in ([False, True] if reuse_seen else [False]):
        goal = n if seen_pass or not reuse_seen else n - n // 3
        for _ in range(200 * n + 2000):
            if len(out) >= goal:
                break
            fields, answer = t.sample(rng)
            payload = " | ".join(fields[k] for k in sorted(fields))
            if bucket(task, payload) != ("train" if seen_pass else split):
                continue
            k = rng.randrange(n_templates)
            if seen_pass and k < len(t.train_templates):  # seen payloads only in new wording
                k = rng.randrange(len(t.train_templates), len(t.templates))
            prompt = t.templates[k].format(**fields)
            if prompt not in out:
                heldout = k >= len(t.train_templates)
                out[prompt] = Example(task, prompt, answer, payload, k, heldout, seen_pass)
    return list(out.values())


# ---------------------------------------------------------------- beyond single tasks

COMPOSITE_HEADER = "Answer each part on its own line."


@dataclass(frozen=True)
class Composite:
    prompt: str
    parts: tuple[Example, ...]

    @property
    def answer(self) -> str:
        return numbered([p.answer for p in self.parts])


def composite_prompt(parts: list[str]) -> str:
    return numbered(parts, header=COMPOSITE_HEADER)


def composites(n_parts: int, count: int, split: str = "test", seed: int = 0,
               tasks: tuple[str, ...] | list[str] | None = None) -> list[Composite]:
    """`count` composite prompts, each drawing `n_parts` parts from `n_parts` different tasks
    (of `tasks` only, when given: then no part needs an adapter outside them)."""
    names = TASK_NAMES if tasks is None or sorted(tasks) == sorted(TASK_NAMES) else tuple(sorted(tasks))
    if not 1 <= n_parts <= len(names):
        raise ValueError(f"n_parts must be 1..{len(names)}")
    pools = {t: examples(t, split, count * n_parts, seed=seed + 7) for t in names}
    key = "" if names is TASK_NAMES else "|" + ",".join(names)
    rng = random.Random(zlib.crc32(f"composite|{n_parts}|{split}|{seed}{key}".encode()))
    out = []
    for i in range(count):
        tasks = rng.sample(names, n_parts)
        parts = tuple(pools[t][(i + j) % len(pools[t])] for j, t in enumerate(tasks))
        out.append(Composite(composite_prompt([p.prompt for p in parts]), parts))
    return out


def out_of_suite(split: str, n: int, seed: int = 0) -> list[str]:
    """Prompts no adapter in the suite is for: the router's bundled generic prompts."""
    return generic_prompts(split, n, seed)
