"""Running a batch of requests: the one path every answer takes (`Switch.chat`, `Switch.stream`
and the server's worker all call `run`).

Requests become rows (a multi-part request: one row per part, `switch.parts`), and the rows are
decoded with as few `generate` calls as possible:

* rows must share sampling settings (`generate` samples a batch with one set): greedy rows all
  batch together, sampled ones by (temperature, top_p); a *seeded* sampled request decodes alone
  so its seed reproduces its answer whatever else is in flight; echo rows (prompt logprobs keep
  every prefill logit) batch only with each other;
* within those, one policy per (model, router) decides all of its rows at once; static policies
  (explicit adapters, `base`, sequence-level routing) share one forward through `RowsPolicy`; a
  per-layer router (Arrow, gates: `policy.dynamic`) gets a forward of its own.

Each row keeps its own decoding state apart from its request (`Row`): its token limit, stop
strings, incremental text, and what it has streamed. A row that reaches its `max_tokens`, hits a
stop string or whose request was cancelled leaves the batch at once, and each request is answered
the moment its last row ends, not when the whole batch does.

Every batch reports where its time went (`phases`, seconds): `route` (building its policies: the
`auto` selector's feature pass), `prefill` (from the `generate` call to its first token: the
prompts' forward), `decode` (the steps after it) and `listener` (detokenizing, stop strings and
events, done per token in `BatchListener`); the first batch of a `run` also carries the round's
`template` (chat templating, parts) and `segment` (the segmentation feature pass). The server
adds them up in /metrics: they are the served path's profile (docs/benchmarks.md).
"""

from __future__ import annotations

import itertools
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from loraswitch.generate import Generation, Listener, Policy, RowsPolicy, SamplingParams, generate
from loraswitch.library import AdapterError
from loraswitch.routing.base import StaleRouterError
from loraswitch.switch.mixture import MixtureError
from loraswitch.switch.parts import PartsAnswer, SingleAnswer, fan_out
from loraswitch.switch.request import Handle, InvalidOutput, Request, RouterUnavailable, Switched, Token
from loraswitch.switch.segment import segment_requests
from loraswitch.switch.text import Detokenizer, StopStrings

log = logging.getLogger("loraswitch.switch")
_batch_ids = itertools.count(1)


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
        return "length" if len(gen.token_ids) >= row.request.max_tokens else None

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
        if gen.finish_reason == "cancelled" or row.answer.gone:
            return
        if gen.finish_reason == "error":
            who = gen.routing.get("adapter", row.request.model) or "base"
            row.answer.failed(InvalidOutput(f"the model produced non-finite logits (NaN or inf) answering with "
                                            f"{who!r}; the requests batched with it were not affected"))
            return
        if row.cut is not None:
            gen.text = row.detok.text[: row.cut]
        row.emit_text(gen.text, len(gen.text), gen, final=True)
        row.answer.done(row.part, gen, row.batch)


def _rows(switch, handle: Handle, max_parts: int | None = None, found=None) -> list[Row]:
    """The rows of one request: one, or one per part of a multi-part request (`found`: the
    parts `switch.segment` detected in it, if it looked)."""
    base = switch.base
    request = handle.request.tokenized(base)
    handle.request = request
    fans = request.model == "auto" and request.is_chat and _fans_out(switch, request.route)
    parts = fan_out(request, base, max_parts, found) if fans else None
    if parts is None:
        answer, parts = SingleAnswer(handle), [request]
    else:
        answer = PartsAnswer(handle, len(parts), base.tokenizer, request.route or "auto", found)
    return [Row(answer, k, p.tokenized(base), Detokenizer(base.tokenizer), StopStrings(p.stop))
            for k, p in enumerate(parts)]


def _fans_out(switch, route: str | None) -> bool:
    try:
        return switch.router(route or "auto").fans_out
    except Exception:  # the router is unavailable: building the policy reports why
        return False


def _policy(switch, rows: list[Row]) -> Policy:
    req = rows[0].request
    texts = [r.request.route_text(switch.base) for r in rows]
    try:
        policy = switch.policy(texts, req.model, req.route, req.allow, req.deny)
    except (AdapterError, MixtureError):
        raise
    except (StaleRouterError, FileNotFoundError, ValueError) as exc:
        raise RouterUnavailable(req.route, exc) from exc
    _note_unrouted(switch, req, texts, policy)
    return policy


def _note_unrouted(switch, req: Request, texts: list[str], policy: Policy) -> None:
    """Hand `switch.on_unrouted` each prompt `auto` sent to no adapter, with the features its
    selector decided on (the shift detector's input). Requests with allow / deny are left out:
    they abstained because they were told to, not because the library lacks their task."""
    hook, feats = switch.on_unrouted, getattr(policy, "features", None)
    if hook is None or feats is None or req.allow is not None or req.deny:
        return
    try:
        for i, decision in enumerate(policy.decisions):
            if decision.adapter is None:
                hook(feats[i], texts[i])
    except Exception:  # noticing new tasks must never cost an answer
        log.exception("recording unrouted prompts failed")


def _chunks(items: list, size: int | None) -> list[list]:
    size = size or max(1, len(items))
    return [items[i : i + size] for i in range(0, len(items), size)]


Call = list[tuple[Policy, list[Row]]]  # the rows of one `generate` call, by the policy that routes them


@contextmanager
def _timed(phases: dict, name: str):
    """Add the seconds of the `with` block to `phases[name]` (the batch's profile)."""
    began = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - began


def _calls(switch, rows: list[Row], max_rows: int | None) -> list[tuple[Call, float]]:
    """The `generate` calls for rows of one sampling setting: one policy per (model, router) and
    chunk; static policies packed together up to `max_rows` rows, each dynamic one alone. Each
    comes with the seconds its policies took to build (a router's feature pass)."""
    by_policy: dict[tuple, list[Row]] = {}
    for row in rows:
        req = row.request
        key = (req.model, req.route, req.allow, req.deny) if req.model == "auto" else (req.model, None)
        by_policy.setdefault(key, []).append(row)
    static: list[tuple[Call, list[float]]] = [([], [])]  # (call, seconds each of its policies took)
    dynamic: list[tuple[Call, list[float]]] = []
    for members in by_policy.values():
        for chunk in _chunks(members, max_rows):
            began = time.perf_counter()
            try:
                policy = _policy(switch, chunk)
            except Exception as exc:
                for row in chunk:
                    row.answer.failed(exc)
                continue
            took = time.perf_counter() - began
            if policy.dynamic is not None:
                dynamic.append(([(policy, chunk)], [took]))
                continue
            if max_rows and sum(len(m) for _, m in static[-1][0]) + len(chunk) > max_rows:
                static.append(([], []))
            static[-1][0].append((policy, chunk))
            static[-1][1].append(took)
    return [(c, sum(t)) for c, t in static + dynamic if c]


def _generate(switch, call: Call, route_s: float = 0.0) -> dict | None:
    """One `generate` call for `call`'s rows (the policies were built over all of them, in
    `route_s` seconds); its info carries its `phases` (see the module doc)."""
    rows = [r for _, members in call for r in members]
    if all(r.answer.gone for r in rows):
        return None
    parts, offset = [], 0
    for policy, members in call:
        parts.append((policy, offset))
        offset += len(members)
    policy = RowsPolicy(parts, len(rows))
    lead = rows[0].request
    wanted = [r.request.logprobs for r in rows if r.request.logprobs is not None]
    params = SamplingParams(max_new_tokens=max(r.request.max_tokens for r in rows),
                            temperature=max(lead.temperature, 0.0), top_p=lead.top_p, seed=lead.seed,
                            logprobs=max(wanted) if wanted else None, echo=lead.echo)
    info = {"id": next(_batch_ids), "size": len(rows), "dynamic": policy.dynamic is not None}
    for row in rows:
        row.batch = dict(info)
        row.answer.started(row.part, dict(info))
    listener = BatchListener(rows)
    began = time.perf_counter()
    try:
        generate(switch.engine, [list(r.request.prompt_ids) for r in rows], policy, params, listener)
    except Exception as exc:
        log.exception("batch %d failed", info["id"])
        for row in rows:
            row.answer.failed(exc)
        info["failed"] = True
    ended = time.perf_counter()
    first = listener.first or ended
    phases = {"route": route_s, "prefill": first - began, "decode": max(0.0, ended - first - listener.seconds),
              "listener": listener.seconds}
    return {**info, "models": sorted({r.request.model for r in rows}), "seconds": round(ended - began, 4),
            "phases": {k: round(v, 5) for k, v in phases.items()}}


def run(switch, handles: list[Handle], max_rows: int | None = None, max_parts: int | None = None,
        requeue=None) -> list[dict]:
    """Answer `handles` (see the module doc); every request gets its events through its handle.
    With an upstream (`switch.escalate`), the requests it should answer go there while the rest
    decode, and those it failed are decoded after (or, with `requeue`, handed to it as they fail,
    without waiting). Returns what each `generate` call was: id, size, dynamic, models, seconds."""
    escalator = getattr(switch, "upstream", None)
    if escalator is None:
        return run_local(switch, handles, max_rows, max_parts)
    local, sent = escalator.split(switch, handles, requeue)
    batches = run_local(switch, local, max_rows, max_parts) if local else []
    fallback = escalator.settle(sent) if requeue is None else []
    return batches + (run_local(switch, fallback, max_rows, max_parts) if fallback else [])


def run_local(switch, handles: list[Handle], max_rows: int | None = None, max_parts: int | None = None) -> list[dict]:
    """`run` on this model alone."""
    rows: list[Row] = []
    phases: dict[str, float] = {}
    try:  # where each prompt changes task: every prompt of the batch in one feature pass
        with _timed(phases, "segment"):
            found = segment_requests(switch, handles)
    except Exception:  # segmentation is an improvement, never a reason to fail a request
        log.exception("segmenting the prompts failed; numbered parts only")
        found = {}
    with _timed(phases, "template"):
        for handle in handles:
            try:
                rows += _rows(switch, handle, max_parts, found.get(id(handle)))
            except Exception as exc:  # e.g. a conversation the chat template refuses
                SingleAnswer(handle).failed(exc)
    by_sampling: dict[tuple, list[Row]] = {}
    for row in rows:
        key = (id(row),) if row.request.decodes_alone else row.request.sampling_key
        by_sampling.setdefault(key, []).append(row)
    batches = []
    with switch.engine.pin():  # adapters removed from now on stay valid for these rows
        for group in by_sampling.values():
            for call, route_s in _calls(switch, group, max_rows):
                info = _generate(switch, call, route_s)
                if info is not None:
                    batches.append(info)
    if batches:  # the round's own phases, once
        batches[0]["phases"].update({k: round(v, 5) for k, v in phases.items()})
    return batches
