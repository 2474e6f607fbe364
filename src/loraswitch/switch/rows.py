"""A batch row's decoding state and the listener that follows it (`switch.run`'s rows): per-row
token limits, stop strings, cancellation, switch events and streaming of text and logprobs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from loraswitch.generate import Generation, Listener
from loraswitch.switch.parts import SingleAnswer
from loraswitch.switch.request import InvalidOutput, Request, Switched, Token
from loraswitch.switch.text import Detokenizer, StopStrings


@dataclass(eq=False)
class Row:
    """One row of a batch (a request, or part `part` of one) and its decoding state."""

    answer: SingleAnswer
    part: int
    request: Request  # the part's own request for a multi-part one (route text, max_tokens)
    detok: Detokenizer
    stops: StopStrings
    batch: dict = field(default_factory=dict)
    sent: int = 0  # characters already emitted
    next_piece: int = 0  # first token whose text is not all emitted yet
    released: int = 0  # tokens whose logprobs were emitted
    cut: int | None = None  # where a stop string starts
    top: str | None = None  # the adapter of the last token (for switch events)

    def emit_text(self, text: str, upto: int, gen: Generation, final: bool = False) -> None:
        """Emit `text[sent:upto]` with its token pieces and the logprobs of completed tokens."""
        done = len(gen.token_ids) if final else self.detok.complete(upto)
        if upto <= self.sent and done <= self.released:
            return
        start = self.next_piece
        pieces, self.next_piece = self.detok.pieces(text, self.sent, upto, gen.trace, self.next_piece)
        logprobs = tuple(gen.logprobs[self.released : done])
        self.answer.event(self.part, Token(text[self.sent : upto], start, tuple(pieces), logprobs))
        self.sent, self.released = max(self.sent, upto), max(self.released, done)


def _top(entry: dict) -> str | None:
    adapters = entry.get("adapters") or {}
    return max(adapters, key=adapters.get) if adapters else None


class BatchListener(Listener):
    """Per-row limits, stop strings, cancellation and streaming for one `generate` call."""

    def __init__(self, rows: list[Row]):
        self.rows = rows
        self.first: float | None = None  # when the first row produced or ended (prefill done)
        self.seconds = 0.0  # spent in this listener (detokenizing, stop strings, events)

    def token(self, r: int, gen: Generation) -> str | None:
        began = time.perf_counter()
        if self.first is None:
            self.first = began
        try:
            return self._token(r, gen)
        finally:
            self.seconds += time.perf_counter() - began

    def _token(self, r: int, gen: Generation) -> str | None:
        row = self.rows[r]
        if row.answer.gone:
            return "cancelled"
        index = len(gen.token_ids) - 1
        top = _top(gen.trace[index])
        if index == 0 or top != row.top:
            row.top = top
            row.answer.event(row.part, Switched(index, top))
        row.detok.add(gen.token_ids[-1])
        text = row.detok.text
        if row.stops:
            row.cut = row.stops.find(text)
            if row.cut is not None:
                return "stop"
        row.emit_text(text, len(text) - row.stops.holdback(text), gen)
        return "length" if len(gen.token_ids) >= row.answer.limit(row.part, row.request.max_tokens) else None

    def finished(self, r: int, gen: Generation) -> None:
        began = time.perf_counter()
        if self.first is None:
            self.first = began
        try:
            self._finished(r, gen)
        finally:
            self.seconds += time.perf_counter() - began

    def _finished(self, r: int, gen: Generation) -> None:
        row = self.rows[r]
        row.answer.ended(row.part, len(gen.token_ids))  # a multi-part answer's unused tokens go to its other parts
        if gen.finish_reason == "cancelled" or row.answer.gone:
            return
        if gen.finish_reason == "error":
            mixed = sorted({a for e in gen.trace for a in e.get("adapters", {})})  # per-token routing mixes several
            who = ", ".join(map(repr, mixed)) if mixed else repr(gen.routing.get("adapter", row.request.model) or "base")
            row.answer.failed(InvalidOutput(f"the model produced non-finite logits (NaN or inf) answering with "
                                            f"{who}; the requests batched with it were not affected"))
            return
        if row.cut is not None:
            gen.stop_reason = row.stops.hit
            gen.text = row.detok.text[: row.cut]
        row.emit_text(gen.text, len(gen.text), gen, final=True)
        row.answer.done(row.part, gen, row.batch)
