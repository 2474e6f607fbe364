"""List markers: where an item of an enumeration starts and which list it continues (numbers,
letters, roman numerals, bullets, labels such as "Q1:" or "Task 2 -"), and enumerations inside a
line ("a) ... b) ...", "(i) ... (ii) ...", "first, ...; second, ..."). Plain text; `routing.units`
turns what these find into units."""

from __future__ import annotations

import re

# "1.", "(2)", "#3", "#4:", or a keycap emoji "5\ufe0f\u20e3" (\u20e3: the combining keycap)
_NUMBER = re.compile(r"\s*(?:\(?(\d{1,2})[.)]|#(\d{1,2})[:.)]?|(\d)\ufe0f?\u20e3)\s+(?=\S)")
_LETTER = re.compile(r"\s*\(?([a-hA-H])[).]\s+(?=\S)")
_ROMAN_LINE = re.compile(r"\s*\(?(i{1,3}|iv|vi{0,3})[).]\s+(?=\S)", re.I)
_BULLET = re.compile(r"\s*([-*\u2022\u25e6\u2023\u2013+])\s+(?=\S)")
_WORD_NUMBERS = "one|two|three|four|five|six|seven|eight"
_WORDS = _WORD_NUMBERS.split("|")
# "Q1:", "Task 2 -", "Part A:", "Task one:"
LABEL = re.compile(r"\s*(?:Q|Question|Task|Part|Request|Step)\s*#?(\d{1,2}|[A-H](?=\s*[-:.)\u2013\u2014])"
                   rf"|(?:{_WORD_NUMBERS})(?=\s*[-:)\u2013\u2014]))?\s*"
                   r"(?:[:.)]|(?<=[\dA-Ha-z])\s*[-\u2013\u2014])\s+(?=\S)", re.I)
# inline enumeration inside a line: "a) ... b) ...", "(1) ... (2) ...", "(i) ... (ii) ..."
_INLINE = re.compile(r"(?:(?<=\s)|^)\(?([a-h]|\d{1,2}|i{1,3}|iv|vi{0,3})\)\s+(?=\S)")
# ... by labels: "Q1: ... Q2: ...", "Task A: ... Task B: ...", or the same bare "Q:" again and again
_INLINE_LABEL = re.compile(r"(?:(?<=\s)|^)(?:Q|Question|Task|Part|Step)\s*(\d{1,2}|[A-H])\s*[:.)]\s+(?=\S)")
_INLINE_Q = re.compile(r"(?:(?<=\s)|^)(Q)\s*:\s+(?=\S)")
_ROMAN = ["i", "ii", "iii", "iv", "v", "vi", "vii", "viii"]
# ... or by ordinal words opening its clauses: "Two things: first, ...; second, ..."
_MONTHS = (r"(?:january|february|march|april|may|june|july|august|september|october|november|december"
           r"|jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec)\b")
_ORDINAL = re.compile(r"(?:^|(?<=[:;,.?!])|(?<=[:;,.?!]\s)|(?<=\band\s))\s*"
                      r"(first|second|third|fourth|fifth|final|last|1st|2nd|3rd|4th|5th)(?:ly)?\b"
                      r"(?:\s+of\s+all)?[,:]?\s+(?!of\b|[\d(]|" + _MONTHS + r")(?=\S)", re.I)  # "1st of May": a date
_ORDINALS = ["first", "second", "third", "fourth", "fifth"]
_NUMERIC_ORDINALS = dict(zip(["1st", "2nd", "3rd", "4th", "5th"], _ORDINALS))
_LAST = ("final", "last")  # "finally" / "lastly" close a list of ordinals: "...; and finally, ..."
_ITEM_END = re.compile(r"[\s;,]*(?:\band)?[\s;,]*$")


def next_key(key: str) -> str:
    """The marker after `key` in its sequence: 1 -> 2, a -> b, i -> ii, first -> second."""
    if key.isdigit():
        return str(int(key) + 1)
    if key == "q":  # a bare "Q:" label: the next is "Q:" again
        return key
    for seq in (_ROMAN, _ORDINALS, _WORDS):  # "Task One:" -> "two"
        if key.lower() in seq:
            i = seq.index(key.lower()) + 1
            return seq[i] if i < len(seq) else ""
    return chr(ord(key) + 1)


def inline(prompt: str, start: int, end: int) -> tuple[int, list[tuple[int, int]]] | None:
    """An inline enumeration ("a) x b) y", "(1) x (2) y", "(i) x (ii) y", "first, x; second,
    y") as (where its lead-in ends, item spans), or None. A lead-in is allowed when it ends with
    a colon ("Please help me with: (a) ... (b) ..."); any other text before the first marker
    makes the markers part of a sentence."""
    line = prompt[start:end]
    for pattern, firsts in ((_INLINE, ("a", "1", "i")), (_INLINE_LABEL, ("1", "a")), (_ORDINAL, ("first",)),
                            (_INLINE_Q, ("q",))):
        found, want = [], None
        for m in pattern.finditer(line):
            key = m.group(1).lower()
            key = _NUMERIC_ORDINALS.get(key, key)
            if key in firsts and not found:
                want = key
            if want is not None and key == want:
                found.append(m)
                want = next_key(key)
            elif len(found) >= 2 and key in _LAST:  # "first, ...; second, ...; and finally, ...": the last item
                found.append(m)
                break
        lead = line[: found[0].start()].strip() if found else ""
        if len(found) >= 2 and (not lead or lead.endswith((":", "\uff1a"))):
            break
    else:
        return None
    ends = [len(_ITEM_END.sub("", line[: found[i + 1].start()])) if i + 1 < len(found) else len(line)
            for i in range(len(found))]  # "(a) x; (b) y", "first, x, and second, y": the separator belongs to neither
    return start + found[0].start(), [(start + m.end(), start + e) for m, e in zip(found, ends)
                                      if line[m.end() : e].strip()]  # "(a) ; (b) x": no empty item


class Lists:
    """Which enumeration a marked line continues (numbers and letters in sequence, the same
    bullet, labels), or a new one."""

    def __init__(self):
        self.next_id = 0
        self.open: dict[str, tuple[int, str]] = {}  # marker kind -> (list id, expected next key)

    def item(self, kind: str, key: str) -> tuple[int, bool]:
        """(list id, whether it continues an open list) for a line marked `kind` with `key`."""
        expected = self.open.get(kind)
        if expected is not None and (expected[1] == key or kind in ("bullet", "label")):
            list_id, cont = expected[0], True
        elif key in ("1", "a", "A", "i") or kind in ("bullet", "label"):
            list_id, cont = self.next_id, False
            self.next_id += 1
        else:
            return -1, False
        self.open = {kind: (list_id, next_key(key) if key else key)}
        return list_id, cont

    def close(self) -> None:
        self.open = {}

    def new(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def marker(line: str) -> tuple[str, str, int] | None:
    """(kind, key, length) of a list marker at the start of `line` (after a byte-order mark)."""
    bom = len(line) - len(line.lstrip("\ufeff"))
    for kind, pattern in (("number", _NUMBER), ("roman", _ROMAN_LINE), ("letter", _LETTER), ("label", LABEL),
                          ("bullet", _BULLET)):
        m = pattern.match(line, bom)
        if m:
            key = next((g for g in m.groups() if g), "")
            return kind, key.lower() if kind == "roman" else key, m.end()
    return None
