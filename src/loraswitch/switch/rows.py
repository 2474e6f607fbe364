"""A batch row's decoding state and the listener that follows it (`switch.run`'s rows): per-row
token limits, stop strings, cancellation, switch events and streaming of text and logprobs; and
how requests become rows (held to the model's context, fanned out into parts, a chained part's
request rewritten once the answer it works on is in)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from loraswitch.generate import Generation, Listener, TokenLogprob
from loraswitch.switch.parts import PartsAnswer, PartsError, SingleAnswer, fan_out
from loraswitch.switch.request import Handle, InvalidOutput, Request, Switched, Token
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
    after: int | None = None  # a chained part: decoded once this part's answer is in (`switch.run`)

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


def _within(lp: TokenLogprob, k: int) -> TokenLogprob:
    """`lp` with only the `k` likeliest alternatives this row asked for: a batch computes the
    most any of its rows asked for (`switch.run`), each answer reports its own."""
    return lp if len(lp.top) <= k else replace(lp, top=lp.top[:k])


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
        if row.request.logprobs is None:  # the batch computes the most any of its rows asked for
            gen.logprobs.clear()
        elif len(gen.logprobs) == len(gen.token_ids):
            gen.logprobs[-1] = _within(gen.logprobs[-1], row.request.logprobs)
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
        if gen.prompt_logprobs:
            k = row.request.logprobs
            gen.prompt_logprobs = [] if k is None else [lp and _within(lp, k) for lp in gen.prompt_logprobs]
        if row.cut is not None:
            gen.stop_reason = row.stops.hit
            gen.text = row.detok.text[: row.cut]
        row.emit_text(gen.text, len(gen.text), gen, final=True)
        row.answer.done(row.part, gen, row.batch)


def request_rows(switch, handle: Handle, max_parts: int | None = None, found=None) -> list[Row]:
    """The rows of one request: one, or one per part of a multi-part request (`found`: the
    parts `switch.segment` detected in it, if it looked); `fits_context` has tokenized the
    request. A chained part's row waits (`after`) for the part whose answer it works on."""
    base, request = switch.base, handle.request
    fans = request.model == "auto" and request.is_chat and _fans_out(switch, request.route)
    try:
        parts, why_whole = (fan_out(request, base, max_parts, found) if fans else None), None
    except PartsError as exc:  # numbered parts it cannot answer one by one: answered whole, and says so
        parts, why_whole = None, str(exc)
    if parts is None:
        answer, parts = SingleAnswer(handle, why_whole), [request]
    else:
        answer = PartsAnswer(handle, len(parts), base.tokenizer, request.route or "auto", found,
                             pool=parts[0].max_tokens)  # fan_out gave each part the whole pool
    chained = [q.after for q in found.parts] if found is not None and len(parts) > 1 else [None] * len(parts)
    return [Row(answer, k, p.tokenized(base), Detokenizer(base.tokenizer), StopStrings(p.stop), after=after)
            for k, (p, after) in enumerate(zip(parts, chained))]


def chained_ready(switch, waiting: list[Row]) -> tuple[list[Row], list[Row]]:
    """The chained parts (`Row.after`) whose part before is answered, their requests rewritten
    with that answer (`PartsAnswer.chained`), and those still waiting. A part of a request that is
    over (failed, stopped at a stop string, cancelled) is dropped; one whose answer before was cut
    at max_tokens ends empty (`PartsAnswer.cut_short`)."""
    ready, still = [], []
    for row in waiting:
        if row.answer.gone:
            continue
        before = row.answer.answer_of(row.after)
        if before is None:
            still.append(row)
            continue
        # an answer cut at max_tokens is nothing whole to work on; or no token is left to write
        if before.finish_reason == "length" or row.answer.starved(row.part):
            row.answer.cut_short(row.part)
            continue
        try:
            row.request = within_context(switch, row.answer.chained(row.part, row.request, before.text))
        except Exception as exc:  # its prompt with the answer written in no longer fits
            row.answer.failed(exc)
            continue
        ready.append(row)
    return ready, still


def _fans_out(switch, route: str | None) -> bool:
    try:
        return switch.router(route or "auto").fans_out
    except Exception:  # the router is unavailable: building the policy reports why
        return False


def fits_context(switch, handle: Handle) -> bool:
    """Tokenize the request and hold it to the model's context: a prompt that fills it fails
    alone, at once (a 28k-token prompt once ran for minutes and answered noise), and `max_tokens`
    is cut to what the context leaves (the answer then ends with finish_reason "length")."""
    try:
        handle.request = within_context(switch, handle.request)
        return True
    except Exception as exc:  # a template that refuses the conversation, too long, empty
        SingleAnswer(handle).failed(exc)
        return False


def asks_what_exists(switch, handle: Handle) -> bool:
    """Whether the request's model, router and allow / deny name what this switch has, as
    `Switch.chat` and the server check before they queue a request; one that does not fails
    alone (`Switch.stream` and `run` take requests built by hand: an unknown name in `allow`
    was answered by the base model, `allow` with a named adapter was ignored)."""
    r = handle.request
    try:
        switch.resolve(r.model, r.route, r.allow, r.deny)
        return True
    except Exception as exc:
        SingleAnswer(handle).failed(exc)
        return False


def within_context(switch, request: Request) -> Request:
    """`request` tokenized, its `max_tokens` cut to what the model's context leaves; raises
    ValueError for an empty prompt or one that fills the context."""
    request = request.tokenized(switch.base)
    n = len(request.prompt_ids)
    if not n:
        raise ValueError("the prompt is empty")
    context = int(getattr(switch.base.model.config, "max_position_embeddings", 0) or 0)
    if context and n >= context:
        raise ValueError(f"the prompt has {n} tokens; the model's context holds {context} "
                         "(prompt and answer together)")
    if context and n + request.max_tokens > context:
        request = replace(request, max_tokens=context - n)
    return request
