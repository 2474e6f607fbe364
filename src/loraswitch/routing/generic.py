"""Generic prompts that no task adapter is for: the bundled `__none__` class a trained router
learns to abstain on when a user's example folder brings no `__none__` file of its own. They
belong to the router, not to any task suite.

Two kinds, drawn half and half until the open requests run out: 20 templates over 40 topics
make 800, about 650 of them in the train split, so of the 2,000 prompts a router trains on about
a third are open requests and two thirds near misses (of 400 validation prompts, 76 open).
*Open requests* (haikus, fun facts, advice) are what a chat model is asked most. *Near misses* are requests that look like a narrow task and ask something
else: other arithmetic, numbers in other languages, other date questions, other output formats,
other string operations, other classifications, plain text work, code and trivia. With only open
requests to learn from, the demo router sent 123 of 160 near misses to an adapter ("Multiply 12
by 7" to an addition adapter, "Translate to German: ..." to a French one), every one with
confidence 1.00 (`benchmarks/routing_probe.py`, docs/routing.md "Near misses"). The families stop
short of a task's own variants and inputs: sorting descending is left out (a sorting adapter may
well do both ways), and so are questions about a list of numbers that sorting would answer in
passing (its largest, its smallest, its median): in a first training with them, 7 of the demo's
sort_numbers test prompts in one held-out wording went to the base model and 5 free-form
composites lost their sorting part. A near miss can still be a user's own task (a
library with a multiplication adapter): `train-router --no-bundled-none` leaves these prompts out
and trains on the user's `__none__.txt` alone (`routing.data.read_folder`).
"""

from __future__ import annotations

import functools
import random
import re
import zlib

BUNDLED_TRAIN, BUNDLED_VAL = 2000, 400  # bundled prompts a router trains and calibrates on


def _split_of(prompt: str) -> str:
    """The split a prompt belongs to, forever: 80% train, 10% val, 10% test."""
    h = zlib.crc32(f"oos|{prompt}".encode()) % 20
    return "train" if h < 16 else ("val" if h < 18 else "test")


_OPEN_TEMPLATES = (
    "Write a haiku about {topic}.",
    "Tell me a fun fact about {topic}.",
    "Explain {topic} to a ten-year-old.",
    "Give me three tips about {topic}.",
    "Write a short poem about {topic}.",
    "What are the pros and cons of {topic}?",
    "Suggest a name for a blog about {topic}.",
    "Describe {topic} in one sentence.",
    "Why do people like {topic}?",
    "Write a tweet about {topic}.",
    "Write a limerick about {topic}.",
    "What is the history of {topic}?",
    "Recommend a book about {topic}.",
    "Write a two-line story about {topic}.",
    "How would a pirate describe {topic}?",
    "Compose a short song chorus about {topic}.",
    "What questions would a child ask about {topic}?",
    "Give a motivational quote inspired by {topic}.",
    "Plan a weekend around {topic}.",
    "Summarize why {topic} matters.",
)

# near misses, one tuple of templates per family; {slots} are filled from _SLOTS
_NEAR_MISS_FAMILIES = {
    "arithmetic": (
        "What is {a} times {b}?", "Multiply {a} by {b}.", "What is {big} divided by {b}?",
        "What is {big} minus {a}?", "Subtract {a} from {big}.", "What is {pct}% of {big}?",
        "What is {a} squared?", "Is {a} a prime number?", "What is the square root of {square}?",
        "Calculate {a} x {b} for me.", "How much is {big} / {b}?", "What is {a} to the power of 3?",
        "What's the remainder when {big} is divided by {b}?", "Round {dec} to the nearest whole number.",
        "Is {big} even or odd?", "What is the average of {a}, {b} and {a2}?",
    ),
    "number_forms": (
        "How do you write {a} in {lang}?", "Write the number {a} in {lang} words.",
        "Translate {a} into {lang}.", "Write {a} in Roman numerals.", "What is {a} in binary?",
        "Convert {a} to hexadecimal.", "Write 'forty-two' as digits.", "What number is 'three hundred and six'?",
        "How do you say {a} in {lang}?", "Spell out {a} in {lang}, please.", "What is the Roman numeral {roman}?",
    ),
    "dates": (
        "What day of the week was {date}?", "How many days are there between {date} and {date2}?",
        "Write {date} in US format (MM/DD/YYYY).", "How many days are in {month}?", "Which season is {month} in?",
        "How many years ago was {year}?", "Is {year} a leap year?", "What was the date 30 days after {date}?",
        "What month comes after {month}?", "Write {date} the British way, day first.",
        "Which century is the year {year} in?", "Write {iso} as month/day/year.", "Spell out the date {iso} in words.",
        "What is the date two weeks after {date}?", "How old is someone born on {date} today?",
    ),
    "formats": (
        "Convert this to YAML: {person}", "Turn this into a CSV row: {person}", "Write this as XML: {person}",
        "Give me {person} as a YAML mapping.", "Make a CSV file with a header row from: {person}",
        "Is this valid JSON? {{\"a\": [1, 2}}", "Write a JSON schema for a {thing} with a name and a price.",
        "Make a markdown table of these fruits and their colors: {fruits}.", "Give me a JSON list of three {things}.",
        "Write a JSON object describing a {thing} with its price and weight.", "Format this as a bulleted list: {fruits}.",
        "Write a recipe for {dish} as a JSON object with ingredients and steps.", "Convert this JSON to YAML: {{\"a\": 1, \"b\": 2}}",
        "Write an HTML table with two columns, name and age.", "Put these words in a numbered list: {phrase}",
    ),
    "strings": (
        "Capitalize every word: {phrase}", "Reverse the letters of the word '{word}'.", "How many letters are in '{word}'?",
        "Count the vowels in '{word}'.", "Sort these words alphabetically: {phrase}", "Remove the vowels from '{word}'.",
        "Make this uppercase: {phrase}", "What is the first letter of each word in '{phrase}'?",
        "Spell '{word}' backwards.", "Does '{word}' rhyme with '{word2}'?", "Which word is longest: {phrase}?",
        "Replace every space with a dash: {phrase}", "Write '{phrase}' in pig latin.",
        "Write '{phrase}' backwards, letter by letter.", "Reverse each word's letters in: {phrase}",
        "Make every other letter uppercase: {phrase}", "Shuffle the words of: {phrase}",
    ),
    "classify": (
        "Is this email spam or not? {spam}", "What language is this sentence in: {foreign}",
        "Is this sentence formal or informal: {casual}", "Which topic is this headline about: {headline}",
        "Rate this review from 1 to 5 stars: {review}", "What emotion does this text express: {feeling}",
        "Is this statement a fact or an opinion: {opinion}", "Detect the language: {foreign}",
        "Is this tweet sarcastic? {sarcasm}", "Which category fits this product: {thing}? Electronics, clothing or food?",
        "Is this message toxic? {rude}", "How many stars would you give this review: {review}",
        "Is this review written by a bot? {review}", "Which is it, joy, anger or fear: {feeling}",
    ),
    "ordering": (
        "Sort these names alphabetically: {names}", "Put these cities in order of population: {cities}.",
        "Sort these words by length: {phrase}", "Sort these dates oldest first: {date}, {date2}",
        "Order these planets by size: Mars, Jupiter, Earth.", "Rank these fruits by sweetness: {fruits}.",
    ),
    "text": (
        "Summarize this paragraph: {paragraph}", "Fix the grammar: {bad_grammar}", "Paraphrase this sentence: {sentence}",
        "Translate into {lang}: {sentence}", "Rewrite this in the passive voice: {sentence}", "Give me a synonym for '{adj}'.",
        "What is the opposite of '{adj}'?", "Make this sentence more polite: {rude}", "Shorten this to five words: {sentence}",
        "Translate to {lang}: {sentence}", "Write a title for this text: {paragraph}", "Continue this story: {sentence}",
    ),
    "code": (
        "Write a Python function that {code_task}.", "Write a SQL query that selects all {things} cheaper than 10.",
        "What does this code do: {code}", "Fix this Python bug: {code}", "Write a regular expression that matches {regex}.",
        "Explain what a {concept} is in programming.", "Write a bash one-liner that {shell_task}.",
        "Convert this loop to a list comprehension: {code}",
    ),
    "knowledge": (
        "What is the capital of {country}?", "Who wrote {book}?", "How many legs does a {animal} have?",
        "What is the boiling point of water in Fahrenheit?", "Who painted the Mona Lisa?", "How far is the Moon from Earth?",
        "Which planet is closest to the Sun?", "What is the population of {city}?", "What currency is used in {country}?",
        "What language is spoken in {country}?", "What time zone is {city} in?", "Where do {animal}s live?",
        "Convert {a} kilometers to miles.", "How many grams are in {a} pounds?", "What is {a} degrees Celsius in Fahrenheit?",
    ),
    "chat": (
        "Hello!", "Hi there, how are you?", "Thanks, that's all.", "Can you help me?", "What can you do?",
        "Tell me a joke.", "Good morning!", "Who are you?", "I'm bored. Any ideas?", "What should I cook tonight?",
        "Write an email to my {person_role} asking for a day off.", "How do I stay focused while studying?",
    ),
}

_SLOTS = {
    "topic": ["autumn", "the sea", "coffee", "gardening", "chess", "volcanoes", "penguins", "jazz music", "bicycles", "the moon", "rainy days", "mountains", "friendship", "baking bread", "old libraries", "trains", "winter mornings", "honeybees", "kites", "lighthouses", "desert nights", "tea ceremonies", "city parks", "thunderstorms", "origami", "space travel", "dinosaurs", "pottery", "ocean tides", "street food", "camping", "snowflakes", "owls", "classical music", "sunflowers", "hot air balloons", "rock climbing", "board games", "fireflies", "recycling"],
    "lang": ["German", "Spanish", "Italian", "Japanese", "Portuguese", "Dutch", "Swedish", "Chinese", "Russian", "Polish", "Turkish", "Greek"],
    "month": ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"],
    "roman": ["XIV", "XXIX", "MCMXC", "LXXVII", "CDIV", "IX"],
    "person": ["Alice, 30, London", "name Bob, age 41, city Rome", "Chen is 25 and lives in Lyon", "Dana (52) from Austin"],
    "fruits": ["apple, banana, cherry", "kiwi, lemon, plum", "grape, mango, pear"],
    "things": ["books", "movies", "fruits", "planets", "cars", "songs", "products", "cities"],
    "thing": ["laptop", "bicycle", "toaster", "backpack", "phone", "lamp"],
    "dish": ["pancakes", "tomato soup", "guacamole", "fried rice"],
    "phrase": ["the quick brown fox", "pear apple fig grape", "hello world again", "blue moon rising slowly", "cats chase small mice"],
    "word": ["banana", "necessary", "rhythm", "elephant", "window", "strawberry", "planet"],
    "word2": ["cat", "orange", "light", "tree"],
    "spam": ["You won a free cruise! Click here now.", "Meeting moved to 3pm, see you there.", "Claim your prize of $1000 today!!!"],
    "foreign": ["Je voudrais un café.", "Wo ist der Bahnhof?", "Me gusta mucho la playa.", "Ik hou van fietsen."],
    "casual": ["hey wanna grab food later?", "Dear Sir, I am writing to inform you of a delay.", "lol that was wild"],
    "headline": ["Stocks rally as inflation cools", "Local team wins the championship", "New vaccine approved by regulators"],
    "review": ["Decent blender, a bit loud.", "Absolutely love this jacket, five stars!", "Broke after two days."],
    "feeling": ["I can't believe they cancelled my flight again.", "We're getting married next spring!", "I miss my grandmother."],
    "opinion": ["Paris is the capital of France.", "Pizza is the best food ever.", "Water boils at 100 degrees Celsius."],
    "sarcasm": ["Oh great, another Monday. Just what I needed.", "Thanks for the lovely weather today!"],
    "names": ["Zoe, Adam, Maria, Ben", "Olga, Tom, Ines, Kenji"],
    "cities": ["Tokyo, Oslo, Lima", "Paris, Cairo, Seoul"],
    "paragraph": ["The committee met on Tuesday to discuss the budget. They agreed to cut spending on travel and to hire two engineers.", "Rain fell all night. By morning the river had risen over its banks and the bridge was closed."],
    "bad_grammar": ["he go to school yesterday", "me and him was late", "she don't like apples", "their going too the park"],
    "sentence": ["The cat chased the mouse across the kitchen.", "We will meet at the station at noon.", "The weather is nice today."],
    "adj": ["happy", "fast", "bright", "ancient", "brave"],
    "rude": ["Give me the report now.", "Move your car.", "Answer my email."],
    "code_task": ["reverses a list", "checks whether a string is a palindrome", "counts the words in a file", "returns the largest of three numbers"],
    "code": ["for i in range(3): print(i)", "x = [1, 2, 3]; print(x[3])", "def f(a): return a * 2"],
    "regex": ["an email address", "a US phone number", "a date like 2024-01-31"],
    "concept": ["closure", "recursion", "hash map", "race condition"],
    "shell_task": ["counts the lines of every .py file", "finds files larger than 1 GB"],
    "country": ["France", "Japan", "Brazil", "Kenya", "Canada", "Norway", "Egypt", "Peru"],
    "city": ["London", "Tokyo", "Sydney", "Chicago", "Mumbai"],
    "book": ["Pride and Prejudice", "Moby Dick", "War and Peace", "Hamlet"],
    "animal": ["spider", "octopus", "horse", "penguin", "ant"],
    "person_role": ["boss", "teacher", "landlord"],
}


def _fill(template: str, rng: random.Random) -> str:
    """`template` with every {slot} filled: numbers and dates drawn, other slots from _SLOTS."""
    a, b = rng.randint(3, 99), rng.randint(2, 12)
    year = rng.randint(1900, 2030)
    numbers = {
        "a": a, "a2": rng.randint(3, 99), "b": b, "big": rng.randint(100, 9999), "pct": rng.choice([5, 10, 15, 20, 25, 50]),
        "square": rng.randint(2, 30) ** 2, "dec": round(rng.uniform(1, 100), 2), "year": year,
        "date": f"{rng.choice(_SLOTS['month'])} {rng.randint(1, 28)}, {year}",
        "date2": f"{rng.choice(_SLOTS['month'])} {rng.randint(1, 28)}, {rng.randint(1900, 2030)}",
        "iso": f"{year}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
    }
    fields = {k: rng.choice(v) for k, v in _SLOTS.items()} | numbers
    return template.format(**fields)


def generic_prompts(split: str, n: int, seed: int = 0, near_misses: bool = True) -> list[str]:
    """Up to `n` distinct generic prompts of `split` (train / val / test: 80 / 10 / 10 by hashing
    the prompt): an open request or a near miss from a family drawn at random, half and half
    until the open requests run out (the module doc). `near_misses` False: open requests only,
    the kind the bundled set held before (for `benchmarks/routing_probe.py`); there are fewer
    than `n` of those when `n` is large (648 in the train split)."""
    rng = random.Random(zlib.crc32(f"oos|{split}|{seed}".encode()))
    families = list(_NEAR_MISS_FAMILIES.values())
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(60 * n):
        if len(out) >= n:
            break
        templates = _OPEN_TEMPLATES if not near_misses or rng.random() < 0.5 else rng.choice(families)
        prompt = _fill(rng.choice(templates), rng)
        if _split_of(prompt) == split and prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    return out


def fills_a_template(prompt: str) -> bool:
    """Whether `prompt` is one of the bundled templates with its slots filled (any words in
    them): a probe prompt that does is a near miss the router was all but shown."""
    return any(_template_pattern(t).fullmatch(prompt) for t in _all_templates())


def _all_templates() -> list[str]:
    return [*_OPEN_TEMPLATES, *(t for ts in _NEAR_MISS_FAMILIES.values() for t in ts)]


@functools.cache
def _template_pattern(template: str) -> re.Pattern:
    literal = re.escape(template.replace("{{", "{").replace("}}", "}"))
    return re.compile(re.sub(r"\\\{[a-z_0-9]+\\\}", ".+", literal), re.S | re.I)
