"""BIG-bench's metrics in generative form: the model writes its answer, we compare text.

Multiple choice (`multiple_choice_grade` in BIG-bench, which ranks the options by likelihood)
becomes: the answer's first non-empty line, normalised, equals the correct option's text.
`exact_str_match` becomes: that line equals any listed target. Normalising forgives what a
generative answer adds around the same choice: case, surrounding whitespace and quotes, a final
full stop, a leading `choice:` echoed from the prompt.
"""

from __future__ import annotations

import re

_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = line.strip()
    if line.lower().startswith("choice:"):
        line = line[len("choice:"):]
    line = _SPACE.sub(" ", line).strip().strip("\"'`").strip()
    return line.rstrip(".").strip().lower()


def score(output: str, targets: tuple[str, ...] | list[str] | str) -> bool:
    """Whether `output` gives one of `targets` (an option text, or an accepted answer)."""
    targets = (targets,) if isinstance(targets, str) else targets
    got = normalize(output)
    return bool(got) and any(got == normalize(t) for t in targets)
