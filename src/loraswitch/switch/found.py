"""What segmentation finds (`switch.segment`): the parts of a prompt, each with its text, its
span, what its row answers (its words, the prompt from the part before it on, or, chained, the
answer before it written in), and the spans that joined no part. `finish` turns planned parts
into these."""

from __future__ import annotations

from dataclasses import dataclass, field

from loraswitch.routing.requests import follows_as_next, names_result, points_back, works_on
from loraswitch.routing.units import PROSE, Unit, clean


@dataclass
class Part:
    """One part to answer: its text (the units' words, markers and connectives dropped: what
    routes it), its characters in the prompt (`start`, `end`), how it was found (`kind`), the
    unit-level decision (adapter, confidence) the cut was made on, and what its adapter answers
    (`answered`: its text, or the prompt from the part before it on when it points back at that
    one: "Spell out 58 in English, and then write it in French." answers "write it in French"
    with the 58 in sight, where its words alone made `num_to_french` write "quinze"). A part
    that works on the answer before it ("What is 25 + 17? Then spell the result in English.") is
    chained instead (`after`): answered once that part is, with its answer written in ("Spell 42
    in English.", `switch.run`)."""

    units: list[int]
    firm: bool  # an enumeration item: never merged with a neighbour
    adapter: str | None
    confidence: float
    context: list[int] = field(default_factory=list)
    start: int = 0
    end: int = 0
    text: str = ""
    kind: str = ""
    answered: str = ""
    after: int | None = None  # the part whose answer it works on ("Then spell the result in English.")
    read: str = ""  # what its row read once that answer was written in (`requests.with_result`)

    @property
    def for_base(self) -> bool:
        """Cut because no adapter fits it (a request asked next to another): the base model
        answers it, not routed again (`parts.fan_out`, `Switch.route`)."""
        return bool(self.units) and self.adapter is None and self.after is None

    @property
    def chained(self) -> bool:
        """Answered after part `after`, with that part's answer written into its words."""
        return self.after is not None

    def to_dict(self) -> dict:
        chain = {"chained_from": self.after + 1, **({"read": self.read} if self.read else {})} if self.chained else {}
        return {"span": [self.start, self.end], "kind": self.kind, "unit_adapter": self.adapter,
                "unit_confidence": round(self.confidence, 4), **chain}


@dataclass
class Segmentation:
    """A prompt's parts (two or more), and the spans that joined no part (instructions, examples)."""

    parts: list[Part]  # fewer than two: the prompt is answered whole
    dropped: list[tuple[int, int]]

    @property
    def numbered(self) -> bool:
        """The parts are a list the user numbered (its size limit is an error, not a fallback)."""
        return bool(self.parts) and all(p.kind == "numbered" for p in self.parts)

    @property
    def texts(self) -> list[str]:
        """The parts' own words: what routes each."""
        return [p.text for p in self.parts]

    @property
    def answered(self) -> list[str]:
        """What each part's adapter answers (`Part.answered`)."""
        return [p.answered or p.text for p in self.parts]


def join_units(prompt: str, units: list[Unit]) -> str:
    """The words of `units` as one text: a newline where the prompt had one between them."""
    out = ""
    for prev, u in zip([None, *units], units):
        if prev is not None:
            out += "\n" if "\n" in prompt[prev.end : u.start] else " "
        out += u.text
    return out.strip()


def finish(prompt: str, units: list[Unit], parts: list[Part], dropped: list[int]) -> Segmentation:
    """Texts and spans of the parts (none when fewer than two: the prompt is answered whole)."""
    if len(parts) < 2:
        return Segmentation([], [])
    last = None  # the unit the part before ends with
    for k, p in enumerate(parts):
        members = sorted(p.units + p.context)
        p.start, p.end = units[members[0]].start, units[members[-1]].end
        prose = all(units[i].kind in PROSE for i in members) and members == list(range(members[0], members[-1] + 1))
        # running prose keeps its own words between units ("Tell me a joke about cats, then explain
        # it."), not its units' joined by a space ("Tell me a joke about cats Explain it.")
        p.text = clean(prompt[p.start : p.end]) if prose else join_units(prompt, [units[i] for i in members])
        first = units[p.units[0]]
        p.kind = "numbered" if first.numbered else first.kind
        lead = units[members[0]]  # the part's opening unit, when it is its request (not context before it)
        first_before = units[parts[k - 1].units[0]] if k else None
        if k and first.list_id >= 0 and first.list_id == first_before.list_id and names_result(lead.text):
            p.after = k - 1  # "1. What is 25 + 17?\n2. Spell the result in English.": the list says "next"
        elif k and not p.firm and not parts[k - 1].firm and members[0] in p.units and lead.kind in PROSE:
            if works_on(prompt, units[last], lead):  # works on the answer: answered after it, routed on it
                p.after = k - 1
            elif points_back(lead.text) and follows_as_next(prompt, units[last], lead):  # names its input
                p.answered = prompt[parts[k - 1].start : p.end].strip()  # answered with it in sight
        last = members[-1]
    return Segmentation(parts, [(units[i].start, units[i].end) for i in sorted(dropped)])
