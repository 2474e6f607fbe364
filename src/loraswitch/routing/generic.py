"""Generic prompts that no task adapter is for (haikus, fun facts, advice...): the bundled
`__none__` class a trained router learns to abstain on when a user's example folder brings no
`__none__` file of its own. They belong to the router, not to any task suite.
"""

from __future__ import annotations

import random
import zlib


def _split_of(prompt: str) -> str:
    """The split a prompt belongs to, forever: 80% train, 10% val, 10% test."""
    h = zlib.crc32(f"oos|{prompt}".encode()) % 20
    return "train" if h < 16 else ("val" if h < 18 else "test")


_OOS_TEMPLATES = (
    "Write a haiku about {t}.",
    "Tell me a fun fact about {t}.",
    "Explain {t} to a ten-year-old.",
    "Give me three tips about {t}.",
    "Write a short poem about {t}.",
    "What are the pros and cons of {t}?",
    "Suggest a name for a blog about {t}.",
    "Describe {t} in one sentence.",
    "Why do people like {t}?",
    "Write a tweet about {t}.",
    "Write a limerick about {t}.",
    "What is the history of {t}?",
    "Recommend a book about {t}.",
    "Write a two-line story about {t}.",
    "How would a pirate describe {t}?",
    "Compose a short song chorus about {t}.",
    "What questions would a child ask about {t}?",
    "Give a motivational quote inspired by {t}.",
    "Plan a weekend around {t}.",
    "Summarize why {t} matters.",
)
_OOS_TOPICS = ["autumn", "the sea", "coffee", "gardening", "chess", "volcanoes", "penguins", "jazz music", "bicycles", "the moon", "rainy days", "mountains", "friendship", "baking bread", "old libraries", "trains", "winter mornings", "honeybees", "kites", "lighthouses", "desert nights", "tea ceremonies", "city parks", "thunderstorms", "origami", "space travel", "dinosaurs", "pottery", "ocean tides", "street food", "camping", "snowflakes", "owls", "classical music", "sunflowers", "hot air balloons", "rock climbing", "board games", "fireflies", "recycling"]


def generic_prompts(split: str, n: int, seed: int = 0) -> list[str]:
    """`n` generic prompts of `split` (train / val / test: 80 / 10 / 10 by hashing the prompt)."""
    rng = random.Random(zlib.crc32(f"oos|{split}|{seed}".encode()))
    out: list[str] = []
    for _ in range(50 * n):
        if len(out) >= n:
            break
        template = rng.choice(_OOS_TEMPLATES)
        topic = rng.choice(_OOS_TOPICS)
        prompt = template.format(t=topic)
        if _split_of(prompt) == split and prompt not in out:
            out.append(prompt)
    return out
