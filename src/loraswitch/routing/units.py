"""A prompt split into candidate units by its own structure: the pieces `switch.segment` scores
with the router to find where one task ends and the next begins, and the question blocks
`routing.segments` plans the gates' one pass by (`question_blocks`). Plain text, no model; it
sits below both, so each reads the same units.

Why structure first: the router can only say which task a piece of text is; where a piece ends
has to come from the text. Every layout people use to list several requests marks its pieces
somehow: tagged or bracketed blocks (`[INST] ... [/INST]`, `<q>...</q>`), list items (numbers,
letters, bullets, "Question 2:"), lines and paragraphs, sentences, and clauses joined by "and
then", "also", "after that", ";" or " | ". Nothing here decides that two units are two tasks; a unit is
only a place where a cut *may* go. `Unit.text` is the unit without its marker, tag or leading
connective, so a part is answered from the words of its request alone.

Answer options (`choice: ...` lines, a label repeated line after line, or capital-letter options
"A. ..." after a question or "Options:") close a multiple-choice question: they and the prose of
their paragraph before them are one unit, never a list of parts.

Worked examples (a question followed by its answer: `[INST]` blocks followed by a numbered list
of answers, "Q: ... A: ...", "x -> y") are marked `example`: they are context, never questions.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, replace

from loraswitch.routing.markers import LABEL, Lists, marker
from loraswitch.routing.markers import inline as find_inline

_TAG = re.compile(r"\[(?P<b>[A-Za-z_]{1,12})\](?P<bc>.*?)\[/(?P=b)\]"
                  r"|<(?P<x>[A-Za-z][\w-]{0,15})(?:\s[^<>]*)?>(?P<xc>.*?)</(?P=x)>", re.S)
_ANSWER = re.compile(r"\s*(?:A|Answer|Output|Result)\s*\d{0,2}\s*:", re.I)
_ARROW = re.compile(r"\s(?:->|=>|\u2192)\s")
_PARA = re.compile(r"\n[ \t]*\n")
# an answer option of the question above it: "choice: ..." / "Option: ..." (a label repeated on
# consecutive lines) or "A. ..." / "(B) ..." (capital letters after a question, or after "Options:",
# "Choose one:" ...; after "Do these:" they are parts)
_OPTION_LABEL = re.compile(r"\s*([A-Za-z][A-Za-z ]{0,15}?)\s*:\s+\S")
_OPTION_LETTER = re.compile(r"\s*\(?([A-H])[.)]\s+\S")
_OPTION_LEAD = re.compile(r".*(?:\?|\b(?:options?|choices?|answers?|choose|select|pick)\b[^:]*:)\s*$", re.I)
# a sentence ends at ".", "?" or "!", or just after a closing quote or bracket that follows one
# ("... 'Great phone, terrible battery.' And write a haiku.")
# ... or at a full-width "？", "！" or "。", which need no space after them
_SENTENCE = re.compile(r"(?:(?<=[.?!])|(?<=[.?!][\"'\u201d\u2019)\]]))\s+(?=[\"'(\[\u201c\u2018]?[A-Z0-9])"
                       r"|(?<=[\uff1f\uff01\u3002])\s*(?=\S)")
# how a request opens: a verb requests start with, a question word, or "can you" and the like
# (not "what a ..." nor a bare "would ...": "what a waste of money", "would come back!"; nor a
# relative clause: "... \u2014 which I bought last week \u2014 ...", "when we got home")
ASKING = (r"(?:please\s+)?(?:tell|give|write|reverse|sort|add|convert|spell|translate|list|explain|describe|"
          r"recommend|suggest|name|find|calculate|compute|summari[sz]e|make|create|put|arrange|order|extract|pull|"
          r"turn|rewrite|change|show|what(?!\s+an?\b)|why|(?:who|how|when|where|which)(?!\s+(?:i|we|he|she|they)\b)|"
          r"(?:can|could|would|will)\s+you)\b")
# a clause ends at ";" (or "；"), before a connective, at a dash set off by spaces or right after a
# sentence's end ("What is 2 + 3? — Spell 13 in English."; "well—known" is a word, "2013 – 2014" a
# range), at an em dash between words only before a request or "then" / "also" ("Sort 9, 4—what is
# 2 + 3?"), and before "as well as", "along with", "in addition" or "plus" before a request ("... in
# order plus convert ...", "7, plus write ..."; "230 plus 418" is a sum, "5, 1, 3 as well as 7 and
# 2" one list, "in English, as well as in French" one request)
_CLAUSE = re.compile(r"\s*[;\uff1b]\s*|,\s*(?:and\s+)?(?:then|after that|afterwards|also|next|finally|"
                     r"second(?:ly)?|third(?:ly)?|lastly)\b,?\s*"
                     r"|\s+and\s+(?:then|also|after that|afterwards|finally|next|second(?:ly)?|third(?:ly)?)\b,?\s*"
                     r"|,\s*and\s+(?=(?:what|who|how|why|when|where|which|(?:can|could)\s+you)\b)"
                     r"|(?<!\d)\s+(?:[\u2014\u2013\u2015]|--)\s+|\s+(?:[\u2014\u2013\u2015]|--)\s+(?!\d)"
                     r"|(?<=[A-Za-z.?!])\s+-\s+(?=[A-Za-z])"  # a hyphen set off by spaces between words
                     r"|(?<=[.?!])\s*[\u2014\u2013\u2015]\s*"
                     rf"|(?<=\w)[\u2014\u2015](?=(?:and\s+)?(?:then|also)\b|{ASKING})"  # "9\u2014what is ..."
                     rf"|,?\s+(?:as\s+well\s+as|along\s+with)\s+(?={ASKING}|\w{{3,}}ing\b)"
                     r"|(?:,?\s+and)?,?\s+in\s+addition(?:\s+to\s+th(?:at|is))?\b(?!\s+to\b),?\s*"
                     rf"|,?\s+plus,?\s+(?={ASKING})"
                     rf"|\s+[/&]\s+(?={ASKING}|(?:is|are|does|do)\b)"  # "add 1 and 2 / what's 73 in French"
                     r"|[,;.!]?\s+(?:btw|oh,?\s+and(?:\s+also)?)\b[,:]?\s*", re.I)
# " | " joins requests in a sentence too ("Sort 5, 3 | reverse: a b"), except in a table row,
# whose cells are one line's data ("| Alice | 30 |"), and in a line that quotes code ("`ps | grep x`"):
# there the pipes are no separators
_CLAUSE_OR_PIPE = re.compile(_CLAUSE.pattern + r"|\s+\|\s+", re.I)
_LEAD = re.compile(r"(?:and\s+)?(?:also|then|after that|afterwards|next|finally|lastly|additionally|besides|"
                   r"first(?:ly)?|second(?:ly)?|third(?:ly)?|in addition|plus|btw|oh,?\s+and(?:\s+also)?|"
                   r"p\.?\s?(?:p\.?\s?)?s|and)\b\.?[,:]?\s+", re.I)  # "P.S.", "PS:", "P.P.S." too


# a declarative sentence: a subject first ("The ...", "There are ...", "I have ..."), or a scene
# set before one ("In a golf tournament, there were ..."), ending without a question mark
SUBJECT = r"(?:a|an|the|this|that|these|those|there|here|it|i|we|they|he|she|my|our|their|his|her|its)\b"
_STATEMENT = re.compile(rf"(?:{SUBJECT}|(?:in|on|at|during|after|before)\b[^,?]{{0,60}},\s*{SUBJECT})[^?]*$", re.I | re.S)
# ... with a finite verb: "The date please." and "The sum of 2 and 3." are requests, not statements
_VERB = re.compile(r"\b(?:is|are|was|were|am|has|have|had|will|would|can|could|does|did)\b"
                   r"|\w['\u2019](?:m|re|ve|d|ll)\b|n['\u2019]t\b"  # I'm, we've, they'd, don't
                   r"|\b(?:it|that|there|he|she|who|what|here)['\u2019]s\b"  # it's, not a possessive's
                   r"|^(?:\S+\s+){1,4}?\w{2,}(?:ed|s)\b", re.I)


PROSE = ("sentence", "clause", "line")  # unit kinds of running text (not list items or blocks)


def is_statement(text: str) -> bool:
    """A declarative sentence, not a request: it can set up the question next to it ("A fruit
    stand sells five fruits: ..."), but is never a part to answer on its own, however
    confidently the selector routes it. Questions, imperatives and units with options are not."""
    text = text.strip()
    return "\n" not in text and _STATEMENT.match(text) is not None and _VERB.search(text) is not None


# a line that names what follows rather than asking anything: "### Task 2", "**Part 1**", "Question 3:"
_LABEL_WORDS = r"(?:task|part|question|exercise|problem|step|section)"
_HEADING = re.compile(rf"^(#{{1,6}}\s.*|\*\*{_LABEL_WORDS}\b[^*?]{{0,30}}\*\*:?|{_LABEL_WORDS}\s*\d+\s*[:.)]?)$", re.I)


def is_heading(text: str) -> bool:
    """A heading line: context that leads the part after it, never the tail of the part before."""
    return _HEADING.match(text.strip()) is not None


@dataclass(frozen=True)
class Unit:
    """One candidate piece of a prompt. `start`/`end`: its characters in the prompt (marker
    excluded); `kind`: block, item, line, sentence or clause; `list_id`: the enumeration (block
    group or list) it is an item of, -1 for prose; `numbered`: an item of a list numbered 1..n;
    `ordered`: an item of a list marked in sequence (numbers, letters, "(i)", "Q1:", "first, ...");
    `line`/`para`: where it sits; `example`: part of a worked example (context, not a question)."""

    start: int
    end: int
    text: str
    kind: str
    list_id: int = -1
    numbered: bool = False
    line: int = 0
    para: int = 0
    answer: bool = False
    example: bool = False
    ordered: bool = False


# full-width punctuation written as the adapters read it ("What is 25 + 17？" -> "... 17?")
_HALF_WIDTH = str.maketrans({"\uff1f": "?", "\uff01": "!", "\u3002": ".", "\uff1a": ":", "\uff1b": ";",
                             "\uff0c": ","})


def clean(text: str) -> str:
    """A unit's words without a leading connective, capitalised as a request on its own
    ("also, sort ..." -> "Sort ..."), full-width punctuation as ASCII: the adapters were trained
    on requests asked alone, in ASCII."""
    text = text.strip().translate(_HALF_WIDTH)
    m = _LEAD.match(text)
    if m and m.end() < len(text):
        text = text[m.end():]
    return text[:1].upper() + text[1:]


# quoted text: double or curly quotes, or single quotes that open after a space or colon and close
# before one (not an apostrophe); what they hold is data, never split
QUOTED = re.compile(r"\"[^\"\n]*\"|\u201c[^\u201d\n]*\u201d|(?<![\w'])'[^'\n]*'(?![\w'])")
# the words that lead a request following another ("Also, ...", "and then ...")
CONNECTIVES = (r"then|also|after that|afterwards|next|finally|lastly|additionally|besides|plus|in addition|"
               r"second(?:ly)?|third(?:ly)?|btw|oh,?\s+and|p\.?\s?(?:p\.?\s?)?s")
# a piece that is nothing but connectives and separators ("..., and then also, after that, ...")
_EMPTY_PIECE = re.compile(rf"[\W_]*(?:(?:and|{CONNECTIVES})\b[\W_]*)*", re.I)


def _pieces(text: str, start: int, pattern: re.Pattern) -> list[tuple[int, int]]:
    """Spans of `text` (at offset `start`) between the matches of `pattern` outside quotes
    ("Reverse: \"I walked home, then made tea.\"" is one piece), pieces of connectives alone
    dropped."""
    quoted = [m.span() for m in QUOTED.finditer(text)]
    out, pos = [], 0
    for m in pattern.finditer(text):
        if any(a < m.start() < b for a, b in quoted):
            continue
        out.append((pos, m.start()))
        pos = m.end()
    out.append((pos, len(text)))
    return [(start + a, start + b) for a, b in out if not _EMPTY_PIECE.fullmatch(text[a:b])]


def _prose(prompt: str, start: int, end: int, **kw) -> list[Unit]:
    """Sentences of a line, and the clauses of each sentence (`_CLAUSE`, and " | " outside tables)."""
    units = []
    row = prompt[start:end].strip().startswith("|") or "`" in prompt[start:end]
    for s0, s1 in _pieces(prompt[start:end], start, _SENTENCE):
        clauses = _pieces(prompt[s0:s1], s0, _CLAUSE if row else _CLAUSE_OR_PIPE)
        kind = "clause" if len(clauses) > 1 else "sentence"
        for c0, c1 in clauses:
            while not row and prompt[c0] in "|; \t":  # "Sort 3, 1 | | tell me ...": the doubled separator
                c0 += 1
            units.append(Unit(c0, c1, clean(prompt[c0:c1]), kind, **kw))
    return units


def _line_units(prompt: str, start: int, end: int, lists: Lists, line: int, para: int) -> list[Unit]:
    """The units of one line outside tagged blocks."""
    text = prompt[start:end]
    if _ANSWER.match(text):
        lists.close()
        return [Unit(start, end, text.strip(), "line", line=line, para=para, answer=True)]
    inline = find_inline(prompt, start, end)
    if inline is not None:
        lead_end, items = inline
        list_id = lists.new()
        lists.close()
        lead = _prose(prompt, start, lead_end, line=line, para=para) if prompt[start:lead_end].strip() else []
        return lead + [Unit(a, b, clean(prompt[a:b]), "item", list_id, False, line, para, ordered=True)
                       for a, b in items]
    mark = marker(text)
    if mark is not None:
        kind, key, length = mark
        list_id, _ = lists.item(kind, key)
        if list_id >= 0:
            s = start + length
            ordered = kind in ("number", "letter", "roman") or (kind == "label" and bool(key))  # "Q1:", "Part A:"
            return [Unit(s, end, clean(prompt[s:end]), "item", list_id, kind == "number", line, para, ordered=ordered)]
    lists.close()
    return _prose(prompt, start, end, line=line, para=para)


def split_units(prompt: str) -> list[Unit]:
    """`prompt`'s candidate units in order (see the module doc), worked examples marked."""
    units: list[Unit] = []
    lists = Lists()
    breaks = [m.start() for m in _PARA.finditer(prompt)]
    pos = 0
    block_list = -1
    for m in [*_TAG.finditer(prompt), None]:
        outside_end = m.start() if m is not None else len(prompt)
        chunk = prompt[pos:outside_end]
        if chunk.strip():
            block_list = -1
        for a, b, blank in _lines(chunk, pos):
            if blank:
                lists.close()
                continue
            units += _line_units(prompt, a, b, lists, prompt.count("\n", 0, a), bisect.bisect(breaks, a))
        if m is None:
            break
        if block_list < 0:
            block_list = lists.new()
        group = "bc" if m.group("bc") is not None else "xc"
        s, e = m.span(group)
        inner = prompt[s:e]
        lead = len(inner) - len(inner.lstrip())
        s, e = s + lead, s + len(inner.rstrip())
        if e > s:
            units.append(Unit(s, e, clean(prompt[s:e]), "block", block_list, False, prompt.count("\n", 0, s),
                              bisect.bisect(breaks, s)))
        pos = m.end()
        lists.close()
    return mark_examples(attach_options(prompt, units))


def _option_lines(lines: list[str]) -> set[int]:
    """Indices of the lines that are answer options (see `_OPTION_LABEL` / `_OPTION_LETTER`)."""
    out: set[int] = set()
    labels = [m.group(1).lower() if (m := _OPTION_LABEL.match(t)) and not LABEL.match(t) and not _ANSWER.match(t)
              else None for t in lines]
    for i, label in enumerate(labels):
        if label is not None and label in (labels[i - 1] if i else None, labels[i + 1] if i + 1 < len(lines) else None):
            out.add(i)
    i = 0
    while i < len(lines):  # capital-letter options A, B, C ... after a question line
        key = ord("A")
        j = i
        while j < len(lines) and (m := _OPTION_LETTER.match(lines[j])) and m.group(1) == chr(key):
            j, key = j + 1, key + 1
        asked = i > 0 and _OPTION_LEAD.match(lines[i - 1]) is not None
        if j - i >= 2 and asked:
            out.update(range(i, j))
        i = max(j, i + 1)
    return out


def attach_options(prompt: str, units: list[Unit]) -> list[Unit]:
    """Fold every answer-option line, and the prose of its paragraph before it, into one unit:
    a multiple-choice question is the paragraph its options close. Its stem alone is often
    no request at all ("The above reasoning is"), and is read, routed and answered with the
    passage it asks about and its options."""
    lines = prompt.split("\n")
    options = _option_lines(lines)
    if not options:
        return units
    out: list[Unit] = []
    for u in units:
        if out and u.line in options and u.kind != "block" and out[-1].line < u.line:
            k = len(out) - 1
            while k > 0 and out[k - 1].kind in PROSE and out[k - 1].para == out[k].para:
                k -= 1
            first = out[k]
            out[k:] = [replace(first, end=u.end, text=clean(prompt[first.start : u.end]), kind="sentence")]
            continue
        out.append(u)
    return out


def _lines(chunk: str, offset: int):
    """(start, end, blank) per line of `chunk`; a blank line ends a paragraph."""
    pos = 0
    for raw in chunk.split("\n"):
        a, b = offset + pos, offset + pos + len(raw)
        yield a, b, not raw.strip()
        pos += len(raw) + 1


def mark_examples(units: list[Unit]) -> list[Unit]:
    """Mark worked examples: a group of blocks followed by answers (a numbered list or answer
    lines) before the next group of blocks; a unit followed by an answer line ("A: ..."); a
    unit that shows its own answer ("x -> y")."""
    out = list(units)
    # empty "A:" lines, two or more, are blanks to fill ("Q: ...\nA:\nQ: ...\nA:"); one closing
    # the prompt is its answer cue (BIG-bench's "Answer:") and marks what it closes as before
    blanks = [u.answer and not _ANSWER.sub("", u.text, count=1).strip() for u in out]
    for i, u in enumerate(out):
        if u.answer and not (blanks[i] and sum(blanks) >= 2):
            out[i] = replace(u, example=True)
            if i > 0 and not out[i - 1].answer:
                out[i - 1] = replace(out[i - 1], example=True)
        elif _ARROW.search(u.text):
            out[i] = replace(u, example=True)
    i = 0
    while i < len(out):
        if out[i].kind != "block":
            i += 1
            continue
        j = i
        while j < len(out) and out[j].kind == "block" and out[j].list_id == out[i].list_id:
            j += 1
        k = j
        while k < len(out) and out[k].kind != "block":
            k += 1
        if any(u.numbered or u.answer for u in out[j:k]):  # the group's answers follow it
            for t in range(i, k):
                if out[t].kind == "block" or out[t].numbered or out[t].answer:
                    out[t] = replace(out[t], example=True)
        i = k
    return out


def question_blocks(prompt: str) -> list[Unit]:
    """The questions of a prompt that asks them as tagged or bracketed blocks (`[INST] ...
    [/INST]`, `<q>...</q>`, any tag `_TAG` reads): its blocks that are not worked examples, when
    there are two or more; else []. A block is one request by how it is written, so it is one
    part however many lines it has, and blocks that carry their answers are context.

    Only blocks: a prompt's lines and list items are also a single request's choice lines and
    steps, which only the router can tell from parts (`switch.segment` scores them; the gates'
    plan reads them line by line, `routing.segments`). None of the BIG-bench eval's 100
    single-task prompts has two (`python scripts/gate_reading.py --library bigbench --n 10`)."""
    found = [u for u in split_units(prompt) if u.kind == "block" and not u.example]
    return found if len(found) >= 2 else []
