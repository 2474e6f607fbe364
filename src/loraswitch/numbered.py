"""The numbered-parts grammar, written once: how a prompt that mixes tasks lists its parts
("1. ...", "2. ..."), and how a numbered answer is written and read back. The library splits
prompts and assembles answers with it; the demo writes composite prompts and scores answers with
it. Plain text only (no model), so anything may import it.
"""

from __future__ import annotations

import re

# one numbered line: "3. text" or "3) text"; the number must be followed by a space or end the line
_LINE = re.compile(r"^\s*(\d{1,2})[.)](?:\s+(.*?))?\s*$")


def numbered_lines(text: str) -> list[tuple[int, str]]:
    """Every numbered line of `text` as (number, content), in order."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            out.append((int(m.group(1)), m.group(2) or ""))
    return out


def split_parts(prompt: str) -> list[str] | None:
    """The parts of a multi-part prompt: at least two non-empty lines numbered 1..n in order
    (other lines, such as an instruction before the list, are ignored); None otherwise."""
    parts: list[str] = []
    for k, content in numbered_lines(prompt):
        if k == len(parts) + 1 and content:
            parts.append(content)
    return parts if len(parts) >= 2 else None


def separator(k: int) -> str:
    """What a numbered answer writes before part k (1-based): "1. ", then "\\n2. ", ..."""
    return f"{k}. " if k == 1 else f"\n{k}. "


def numbered(items: list[str], header: str | None = None) -> str:
    """`items` as a numbered list ("1. a\\n2. b"), after an optional header line."""
    body = "".join(separator(k) + item for k, item in enumerate(items, 1))
    return f"{header}\n{body}" if header else body


def parse_numbered(answer: str, n_parts: int) -> list[str]:
    """A numbered answer read back into its `n_parts` parts (the first line numbered k is part
    k); a part the answer does not number is ""."""
    found: dict[int, str] = {}
    for k, content in numbered_lines(answer):
        found.setdefault(k, content.strip())
    return [found.get(k, "") for k in range(1, n_parts + 1)]
