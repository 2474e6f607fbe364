"""One pass through a plan of several parts (issue 13, item 4): when the gates' plan has parts
left and the adapter answering the current part ends it (a stop token, or a new line after some
text), the generation does not stop. It writes the next part's number into the answer and feeds
the model, in the same pass and KV cache, a cue it reads but the answer does not show: a new user
turn holding the next part's own words (the span of the prompt the gates read as that part), in
the model's chat template, then the start of the assistant's turn. The next adapter then answers
a request shaped like the single requests it was trained on, with everything before it still in
the cache. A part's words are a list item's (its marker dropped: `list_item`) or a question
block's (`units.question_blocks`); plans read from other text get no cues.

Why a cue and not only a number: the single-task adapters of a 135M model do not find, in a
prompt of several parts, the part they are to answer. Feeding "\\n{k}. " alone at each stop and
switching adapter answered 2 of 30 composite-3 parts of the demo (the oracle, each part asked
alone, 29). The cue's tokens are forward steps of the one pass beyond the answer's own token
budget (`Policy.extra_steps`); they are counted and reported, not hidden from the cost.
"""

from __future__ import annotations

import re

from loraswitch.base import Base
from loraswitch.numbered import separator

# a list marker the cue drops from a part's words ("2. ", "b) ", "- "): the part alone is the request
MARKER = re.compile(r"^\s*(?:\d{1,2}[.)]|[A-Za-z][.)]|[-*\u2022])\s+")


def list_item(text: str) -> str | None:
    """A part's words as a list item of the prompt: from its first line that starts with a list
    marker (lines before it lead into the list, "Answer each part:"), the marker dropped; None
    when no line of it is an item.

    A plan read line by line is answered part after part only when its every part is such an
    item: the gates also read some single requests as several parts (5 of the eval's 100
    BIG-bench single-task prompts: a question, then its "choice:" lines), and those answered as
    numbered parts would be wrong (docs/routing.md, `gate`)."""
    lines = text.strip().split("\n")
    start = next((i for i, line in enumerate(lines) if MARKER.match(line)), None)
    if start is None:
        return None
    return (MARKER.sub("", lines[start], count=1) + "\n" + "\n".join(lines[start + 1 :])).strip() or None


def turn_bridge(base: Base) -> tuple[list[int], list[int]]:
    """(the template's tokens from the end of an assistant's text to the start of the next user's
    words, those from the end of a user's words to the start of the assistant's text), read from
    the chat template itself, so no model's markup is written here."""
    tok = base.tokenizer
    marks = [tok(w, add_special_tokens=False)["input_ids"] for w in ("Alpha", "Bravo", "Charlie")]
    ids = base.chat_ids([{"role": "user", "content": "Alpha"}, {"role": "assistant", "content": "Bravo"},
                         {"role": "user", "content": "Charlie"}])
    b_end = _find(ids, marks[1], 0) + len(marks[1])
    c_at = _find(ids, marks[2], b_end)
    return ids[b_end:c_at], ids[c_at + len(marks[2]) :]


def _find(ids: list[int], sub: list[int], start: int) -> int:
    for i in range(start, len(ids) - len(sub) + 1):
        if ids[i : i + len(sub)] == sub:
            return i
    raise ValueError("the chat template does not keep a message's words as they are tokenized alone")


class PartCues:
    """Per row: the cue of each part of the plan, which part is being answered, and the tokens
    still to feed (`feed` is `Policy.feed` for the rows of a `SegmentPolicy`)."""

    def __init__(self, base: Base):
        self.base = base
        self.bridge, self.opening = turn_bridge(base)
        self.cues: list[list[list[int]]] = []  # per row, per part: the hidden tokens
        self.part: list[int] = []  # per row: the part being answered (-1: not begun)
        self.since: list[int] = []  # per row: where the part's own answer starts in `generated`
        self.queue: list[list[tuple[int, bool]]] = []
        self.fed: list[int] = []  # per row: cue tokens read so far (steps the answer does not show)

    def add(self, words: list[str | None]) -> None:
        """A row whose plan has these parts, each given as the request its cue asks (a list
        item's words without the marker, a question block's words; None: the prompt does not
        ask that part as a request of its own). Cues only when there are several parts and
        every one of them is such a request; otherwise the row is answered in one go."""
        tok = self.base.tokenizer
        cues = [self.bridge + tok(w, add_special_tokens=False)["input_ids"] + self.opening for w in words if w]
        self.cues.append(cues if len(words) > 1 and len(cues) == len(words) else [])
        self.part.append(-1)
        self.since.append(0)
        self.queue.append([])
        self.fed.append(0)

    def extra_steps(self) -> int:
        """The most tokens a row feeds beyond its answer: every cue, and every part's number."""
        return max((sum(len(c) + len(self._sep(k)) for k, c in enumerate(cues)) for cues in self.cues), default=0)

    def current(self, row: int) -> int | None:
        """The part row `row` is answering (None: the row has a single part)."""
        return max(0, self.part[row]) if self.cues[row] else None

    def feed(self, row: int, generated: list[int], token: int, stops: bool) -> tuple[int, bool]:
        """`Policy.feed`: the token to go on with, and whether the answer shows it."""
        if not self.queue[row]:
            k = self.part[row]
            if not self.cues[row] or (k >= 0 and (k + 1 >= len(self.cues[row]) or not self._ends(row, generated, token, stops))):
                return token, True
            self._begin(row, k + 1, len(generated))
        token, shown = self.queue[row].pop(0)
        self.fed[row] += not shown
        return token, shown

    def _ends(self, row: int, generated: list[int], token: int, stops: bool) -> bool:
        """The part being written is over: a stop token, or a new line after some text."""
        if stops:
            return True
        text = self.base.tokenizer.decode(generated[self.since[row] :], skip_special_tokens=True)
        return "\n" in self.base.tokenizer.decode([token]) and bool(text.strip())

    def _sep(self, k: int) -> list[int]:
        return self.base.tokenizer(separator(k + 1), add_special_tokens=False)["input_ids"]

    def _begin(self, row: int, k: int, at: int) -> None:
        """Part k starts: its number shown in the answer, then its cue, read but not shown."""
        sep = self._sep(k)
        self.part[row], self.since[row] = k, at + len(sep)
        self.queue[row] = [(t, True) for t in sep] + [(t, False) for t in self.cues[row][k]]
