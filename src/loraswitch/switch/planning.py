"""Parts from the units of one prompt once the selector has scored them (`plan`): which units
are questions, which are context, which lists are answered item by item, and which questions of
one task stay one part. `switch.segment` (its module doc has the rules and why) scores the units,
plans, then checks the cuts."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from loraswitch.routing.requests import opens_as_request, points_back, says_how
from loraswitch.routing.units import PROSE, Unit, is_heading, is_statement
from loraswitch.switch.found import Part

_WORD = re.compile(r"[^\W\d_]{2}")  # two letters in a row: a word, in any script
_OPERATORS = re.compile(r"\b(?:and|or|plus|minus|times|by|to)\b", re.I)  # words between numbers, not a request's


@dataclass(frozen=True)
class Settings:
    min_confidence: float = 0.8  # a unit is a question above this confidence (raw softmax, `Scores`)
    max_merge_gain: float = 8.0  # energy(L+R) - max(energy(L), energy(R)) above this: one request
    min_none: float = 0.8  # a request no adapter fits is a part above this `__none__` probability (raw)


def _firm_lists(units: list[Unit], question: list[bool], how: list[bool]) -> set[int]:
    """Enumerations answered item by item: two or more confident items, or a list marked in
    sequence (1..n, a..h, "Q1:", "first, ...") with one when that is at least half of it (a list
    of tasks may hold requests no adapter takes: "1. Write a haiku. 2. What is 2 + 3?"). Items
    that say how to answer (`how`: "3. Keep each answer short.") are not counted. Any other
    numbered list is what the text around it asks about ("Summarize these steps:" over three
    steps, one of which a fragment-overconfident selector reads as a sum): `plan` makes its
    items context."""
    firm = set()
    for list_id in {u.list_id for u in units if u.list_id >= 0}:
        idx = [i for i, u in enumerate(units) if u.list_id == list_id and not u.example and not how[i]]
        if len(idx) < 2:
            continue
        asked = sum(question[i] for i in idx)
        ordered = all(units[i].ordered for i in idx)
        if asked >= 2 or (ordered and asked and 2 * asked >= len(idx)):
            firm.add(list_id)
    return firm


def _continued(units: list[Unit]) -> list[bool]:
    """Prose lines that go on with the sentence of the line before: it ends with a comma or no
    mark at all, and this one opens with a number."""
    return [i > 0 and u.kind in PROSE and units[i - 1].kind in PROSE and units[i - 1].line < u.line
            and u.text[:1].isdigit() and units[i - 1].text.rstrip()[-1:] not in ".?!:;" for i, u in enumerate(units)]


def _under_colon(units: list[Unit], question: list[bool]) -> list[bool]:
    """The prose lines right under a request ending with a colon: its input ("Reverse the word
    order of this sentence:\nWhat is 620 + 37?"), never a question of their own, however
    confidently read."""
    return [i > 0 and question[i - 1] and units[i - 1].text.endswith(":") and units[i].line > units[i - 1].line
            and units[i].list_id < 0 and units[i - 1].list_id < 0 for i in range(len(units))]


def _own_requests(units: list[Unit], question: list[bool]) -> list[bool]:
    """Questions that are a whole line and a request complete in itself: opening as requests do,
    ending with a mark, not pointing back. Two such lines of one task are two parts ("Spell out 5
    in English.\nSpell out 6 in English." was one, answered "fifty"), where other adjacent units
    of one task stay one part). So are the questions of a line made of nothing else
    (`question_lines`)."""
    count = Counter(u.line for u in units)
    asked = question_lines(units)
    return [q and u.kind in PROSE and (count[u.line] == 1 or u.line in asked) and u.text[-1:] in ".?!"
            and opens_as_request(u.text) and not points_back(u.text) for u, q in zip(units, question)]


def question_lines(units: list[Unit]) -> set[int]:
    """Lines of two or more questions and nothing else, each ending with "?" and opening as a
    request ("What's 11 + 22? What's 33 + 44?"): each is a part of its own, even of one task (the
    screen sends such prompts on, `segment`)."""
    lines: dict[int, list[Unit]] = {}
    for u in units:
        lines.setdefault(u.line, []).append(u)
    return {k for k, us in lines.items() if len(us) > 1
            and all(x.kind in PROSE and x.text.endswith("?") and opens_as_request(x.text) for x in us)}


def _forward(units: list[Unit], adapter: list[str | None], question: list[bool], statement: list[bool]) -> set[int]:
    """Statements that set up the question after them: routed to the task of the next question
    in their paragraph ("Convert the date. The kettle broke. Was the buyer happy?": the review
    belongs to the sentiment question, not to the date)."""
    out, nxt = set(), None
    for i in range(len(units) - 1, -1, -1):
        if question[i]:
            nxt = i
        elif (nxt is not None and units[nxt].para == units[i].para and adapter[i] is not None
              and adapter[i] == adapter[nxt] and statement[i]):
            out.add(i)
    return out


def plan(units: list[Unit], adapter: list[str | None], confidence: list[float],
         settings: Settings = Settings(), asked: list[bool] | None = None,
         chains: list[bool] | None = None) -> tuple[list[Part], list[int]]:
    """Parts from scored units (see the module doc), before the cut check; and the units that
    joined no part. `asked`: the units that are requests no adapter fits; `chains`: the units
    that work on the answer before them, never merged into that part (`_Doc.plan`)."""
    # a statement (`units.is_statement`) is never a question, however confidently routed
    statement = [u.kind in PROSE and is_statement(u.text) for u in units]
    heading = [u.kind in PROSE and is_heading(u.text) for u in units]
    # nor is a unit without a word ("14; 3; 77" cut at its semicolons, "1 plus 4"): data
    worded = [_WORD.search(_OPERATORS.sub(" ", u.text)) is not None for u in units]
    question = [a is not None and c >= settings.min_confidence and not st and not h and w
                for a, c, st, h, w in zip(adapter, confidence, statement, heading, worded)]
    question = [q or bool(asked and asked[i]) for i, q in enumerate(question)]
    # a line going on from the line before, cut mid-sentence ("Could you sort 5, 17, 3,\n11 and 8 for me?")
    question = [q and not c for q, c in zip(question, _continued(units))]
    # a request on the answer before it is one whatever the selector reads in it: its input is
    # that answer, not in its words ("Then write the answer in English." reads `__none__`), and
    # it is routed once the answer is written in (`switch.run`)
    question = [q or bool(chains and chains[i]) for i, q in enumerate(question)]
    question = [q and not below for q, below in zip(question, _under_colon(units, question))]
    # an item saying how to answer ("3. Keep each answer short.") is context of the part before it
    how = [u.list_id >= 0 and not q and says_how(u.text) for u, q in zip(units, question)]
    firm = _firm_lists(units, question, how)
    top = next((u for u in units if u.list_id in firm and u.numbered), None)
    for i, u in enumerate(units):
        if u.numbered and u.list_id not in firm:  # a numbered list of data: what the prompt asks about
            question[i] = False
        elif top is not None and u.list_id < 0 and u.para == top.para and u.line < top.line:
            question[i], heading[i] = False, True  # the lines just above a list of parts introduce it, as a heading
    forward = _forward(units, adapter, question, statement)
    lines = _own_requests(units, question)
    parts: list[Part] = []
    pending: list[int] = []
    dropped: list[int] = []
    for i, u in enumerate(units):
        if u.example:
            dropped.append(i)
            continue
        is_firm = u.list_id in firm and not how[i]
        if not is_firm and not question[i]:
            # context joins the part before it, unless it sets up the next question (then it and
            # whatever follows it up to that question wait), or the part before is a list item
            # of another paragraph
            backward = (parts and not pending and i not in forward and not heading[i]
                        and not (parts[-1].firm and units[parts[-1].units[-1]].para != u.para))
            (parts[-1].context if backward else pending).append(i)
            continue
        last = parts[-1] if parts else None
        setup = any(j in forward for j in pending)
        if (not is_firm and last is not None and not last.firm and last.adapter == adapter[i]
                and (not pending or setup) and not (chains and chains[i])  # a chain is a part of its own
                and not (lines[i] and lines[last.units[-1]] and not last.context and not pending)):
            last.units += last.context + pending + [i]
            last.context, pending = [], []
            last.confidence = min(last.confidence, confidence[i])
            continue
        part = Part([i], is_firm, adapter[i], confidence[i])
        for j in pending:  # leading context: kept when it shares the line or sets up the question, else an
            # instruction (so is the lead-in of an enumeration on its line: "Please help me with: (a) ... (b) ...")
            joins = (units[j].line == u.line and not is_firm) or (setup and units[j].para == u.para)
            (part.context if joins else dropped).append(j)
        pending = []
        parts.append(part)
    dropped += pending
    return parts, dropped
