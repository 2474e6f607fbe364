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

Each row keeps its own decoding state apart from its request (`rows.Row`): its token limit, stop
strings, incremental text, and what it has streamed. A row that reaches its `max_tokens`, hits a
stop string or whose request was cancelled leaves the batch at once, and each request is answered
the moment its last row ends, not when the whole batch does.

Every batch reports where its time went (`phases`, seconds): `route` (building its policies: the
`auto` selector's feature pass), `prefill` (from the `generate` call to its first token: the
prompts' forward), `decode` (the steps after it) and `listener` (detokenizing, stop strings and
events, done per token in `BatchListener`); the first batch of a `run` also carries the round's
`template` (chat templating, parts) and `segment` (the segmentation feature pass). The server
adds them up in /metrics: they are the served path's profile (docs/benchmarks.md).

Continuous batching: with `arrivals` (a server's queue), the last batch of a round that can take
rows in (one static policy, no seed, no echo) asks it between decode steps for waiting requests
that fit (the same sampling settings, logprobs it computes) and they join that batch
(`generate`'s `admit`) instead of waiting for it to end; requests a per-layer router answers are
decoded right after it. Their templating, segmentation and routing count in their phases, their
prefill (chunked, between the running rows' steps) in `decode`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager

from loraswitch.generate import Joining, Policy, RowsPolicy, SamplingParams, generate
from loraswitch.library import AdapterError
from loraswitch.routing.base import StaleRouterError
from loraswitch.routing.features import reading_ahead
from loraswitch.switch.mixture import MixtureError
from loraswitch.switch.parts import SingleAnswer
from loraswitch.switch.request import PENALTIES, Handle, Request, RouterUnavailable
from loraswitch.switch.rows import BatchListener, Row, asks_what_exists, chained_ready, fits_context, request_rows
from loraswitch.switch.segment import segment_requests

log = logging.getLogger("loraswitch.switch")
_batch_ids = itertools.count(1)


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


# A server's queue, asked between decode steps: waiting requests, in order, of at most `rows` rows
# in all, for as long as each one `fits` the running batch (the first that does not stops it).
Arrivals = Callable[[int, Callable[[Request], bool]], list[Handle]]


def _call_policy(call: Call) -> tuple[RowsPolicy, list[Row]]:
    """One policy over all of `call`'s rows, in order."""
    parts, offset = [], 0
    for policy, members in call:
        parts.append((policy, offset))
        offset += len(members)
    rows = [r for _, members in call for r in members]
    return RowsPolicy(parts, len(rows)), rows


def _start(rows: list[Row], info: dict) -> None:
    for row in rows:
        row.batch = dict(info)
        row.answer.started(row.part, dict(info))


class _Joins:
    """The `admit` of one running `generate` call: takes the waiting requests that fit it from
    `arrivals`, makes their rows and policies, and hands the static ones in (their `listener`
    rows added); rows a per-layer router routes wait in `later` for a call of their own, and
    chained parts in `waiting` until the part before them is answered."""

    def __init__(self, switch, arrivals: Arrivals, limits: tuple[int | None, int | None], listener: BatchListener,
                 info: dict, params: SamplingParams):
        self.switch, self.arrivals, self.listener, self.info = switch, arrivals, listener, info
        self.max_rows, self.max_parts = limits
        self.key = listener.rows[0].request.sampling_key
        self.logprobs = params.logprobs
        self.later: list[tuple[Call, float]] = []
        self.waiting: list[Row] = []  # joined requests' chained parts (`Row.after`), for `run_local`
        self.phases: dict[str, float] = {}
        self.seconds = 0.0  # spent here (templating, segmentation, routing), not decoding
        self.joined = 0

    def fits(self, request: Request) -> bool:
        """Whether `request` can decode in this batch: one sampling setting and random generator
        for all, and the logprobs the batch computes."""
        return (not request.decodes_alone and request.sampling_key == self.key
                and (request.logprobs is None or (self.logprobs is not None and self.logprobs >= request.logprobs)))

    def __call__(self, held: int) -> Joining | None:
        room = (self.max_rows or 1 << 30) - held
        handles = self.arrivals(room, self.fits) if room > 0 else []
        if not handles:
            return None
        began = time.perf_counter()
        try:
            with reading_ahead():  # segmentation's pass reads the prompts for the selector too
                rows = _rows_of(self.switch, handles, self.max_parts, self.phases)
                self.waiting += [r for r in rows if r.after is not None]  # chained parts: after this call
                calls = _calls(self.switch, [r for r in rows if r.after is None], None)
            static: Call = []
            for call, route_s in calls:
                self.phases["route"] = self.phases.get("route", 0.0) + route_s
                if call[0][0].dynamic is not None:
                    self.later.append((call, 0.0))
                else:
                    static = call
            if not static:
                return None
            policy, joined = _call_policy(static)
            _start(joined, {**self.info, "size": held + len(joined)})
            self.listener.rows += joined
            self.joined += len(joined)
            return Joining([list(r.request.prompt_ids) for r in joined], policy,
                           max(r.request.max_tokens for r in joined))
        finally:
            self.seconds += time.perf_counter() - began


def _generate(switch, call: Call, route_s: float = 0.0, arrivals: Arrivals | None = None,
              limits: tuple[int | None, int | None] = (None, None),
              ) -> tuple[dict | None, list[tuple[Call, float]], list[Row]]:
    """One `generate` call for `call`'s rows (the policies were built over all of them, in
    `route_s` seconds); its info carries its `phases` (see the module doc). With `arrivals`,
    waiting requests join it (`_Joins`); returns the info, the calls of joined requests that
    need a forward of their own, and their chained parts."""
    policy, rows = _call_policy(call)
    if all(r.answer.gone for r in rows):
        return None, [], []
    lead = rows[0].request
    wanted = [r.request.logprobs for r in rows if r.request.logprobs is not None]
    params = SamplingParams(max_new_tokens=max(r.request.max_tokens for r in rows),
                            temperature=max(lead.temperature, 0.0), top_p=lead.top_p, top_k=lead.top_k,
                            min_p=lead.min_p, **{name: getattr(lead, name) for name in PENALTIES},
                            seed=None if lead.greedy else lead.seed,  # greedy rows draw nothing
                            logprobs=max(wanted) if wanted else None, echo=lead.echo,
                            stop_ids=set() if lead.ignore_eos else None)  # one sampling key: all rows alike
    info = {"id": next(_batch_ids), "size": len(rows), "dynamic": policy.dynamic is not None}
    _start(rows, info)
    listener = BatchListener(rows)
    joins = _Joins(switch, arrivals, limits, listener, info, params) if arrivals is not None else None
    began = time.perf_counter()
    try:
        generate(switch.engine, [list(r.request.prompt_ids) for r in rows], policy, params, listener, admit=joins)
    except Exception as exc:
        log.exception("batch %d failed", info["id"])
        for row in listener.rows:
            row.answer.failed(exc)
        info["failed"] = True
    ended = time.perf_counter()
    first = listener.first or ended
    aside = joins.seconds if joins else 0.0
    phases = {"route": route_s, "prefill": first - began, "decode": max(0.0, ended - first - listener.seconds - aside),
              "listener": listener.seconds}
    for name, value in (joins.phases.items() if joins else ()):
        phases[name] = phases.get(name, 0.0) + value
    info = {**info, "size": len(listener.rows), "joined": joins.joined if joins else 0,
            "models": sorted({r.request.model for r in listener.rows}), "seconds": round(ended - began, 4),
            "phases": {k: round(v, 5) for k, v in phases.items()}}
    return info, (joins.later if joins else []), (joins.waiting if joins else [])


def run(switch, handles: list[Handle], max_rows: int | None = None, max_parts: int | None = None,
        requeue=None, arrivals: Arrivals | None = None) -> list[dict]:
    """Answer `handles` (see the module doc); every request gets its events through its handle.
    With an upstream (`switch.escalate`), the requests it should answer go there while the rest
    decode, and those it failed are decoded after (or, with `requeue`, handed to it as they fail,
    without waiting); `arrivals` is then not asked (a request that joins a running batch would
    skip the escalation decision). Returns what each `generate` call was: id, size, dynamic,
    joined, models, seconds."""
    handles = [h for h in handles if asks_what_exists(switch, h)]
    escalator = getattr(switch, "upstream", None)
    if escalator is None:
        return run_local(switch, handles, max_rows, max_parts, arrivals)
    local, sent = escalator.split(switch, handles, requeue)
    batches = run_local(switch, local, max_rows, max_parts) if local else []
    fallback = escalator.settle(sent) if requeue is None else []
    return batches + (run_local(switch, fallback, max_rows, max_parts) if fallback else [])


def _rows_of(switch, handles: list[Handle], max_parts: int | None, phases: dict[str, float]) -> list[Row]:
    """The rows of `handles` (templated, multi-part ones fanned out), timing `segment` and
    `template` into `phases`; a request that cannot become rows is answered with its error."""
    rows: list[Row] = []
    with _timed(phases, "template"):  # tokenizing is the template phase's work, wherever it happens
        handles = [h for h in handles if fits_context(switch, h)]
    try:  # where each prompt changes task: every prompt of the batch in one feature pass
        with _timed(phases, "segment"):
            found = segment_requests(switch, handles)
    except Exception:  # segmentation is an improvement, never a reason to fail a request
        log.exception("segmenting the prompts failed; numbered parts only")
        found = {}
    with _timed(phases, "template"):
        for handle in handles:
            try:
                rows += request_rows(switch, handle, max_parts, found.get(id(handle)))
            except Exception as exc:  # e.g. a conversation the chat template refuses
                SingleAnswer(handle).failed(exc)
    return rows


def _sampling_calls(switch, rows: list[Row], max_rows: int | None) -> list[tuple[Call, float]]:
    """The `generate` calls for `rows`, grouped by sampling setting first (`_calls` within each);
    a seeded sampled request decodes alone."""
    by_sampling: dict[tuple, list[Row]] = {}
    for row in rows:
        key = (id(row),) if row.request.decodes_alone else row.request.sampling_key
        by_sampling.setdefault(key, []).append(row)
    return [c for group in by_sampling.values() for c in _calls(switch, group, max_rows)]


def _joinable(call: Call) -> bool:
    """Whether rows may join `call` while it decodes: one static policy, sampling that does not
    depend on the batch (no seed) and prefill logits of the last position only (no echo)."""
    req = call[0][1][0].request
    return call[0][0].dynamic is None and not req.decodes_alone and not req.echo


def run_local(switch, handles: list[Handle], max_rows: int | None = None, max_parts: int | None = None,
              arrivals: Arrivals | None = None) -> list[dict]:
    """`run` on this model alone. With `arrivals`, the round's last joinable call takes waiting
    requests in as it decodes (module doc), then the joined requests that could not share it."""
    phases: dict[str, float] = {}
    with reading_ahead():  # segmentation's pass reads the prompts for the selector too
        rows = _rows_of(switch, handles, max_parts, phases)
        waiting = [r for r in rows if r.after is not None]  # chained parts: once the part before is answered
        batches = []
        with switch.engine.pin():  # adapters removed from now on stay valid for these rows
            calls = _sampling_calls(switch, [r for r in rows if r.after is None], max_rows)
            open_call = max((i for i, (c, _) in enumerate(calls) if _joinable(c)), default=None) if arrivals else None
            if open_call is not None:  # it decodes last: the others must not wait for the arrivals it takes in
                calls.append(calls.pop(open_call))
            open_index = len(calls) - 1 if open_call is not None else None
            for i, (call, route_s) in enumerate(calls):
                info, later, chained = _generate(switch, call, route_s, arrivals if i == open_index else None,
                                        (max_rows, max_parts))
                calls += later
                waiting += chained
                if info is not None:
                    batches.append(info)
                if waiting:
                    ready, waiting = chained_ready(switch, waiting)
                    calls += _sampling_calls(switch, ready, max_rows)
        for row in waiting:  # their part before never answered (it cannot: every call has run)
            row.answer.failed(RuntimeError(f"part {row.part + 1} waited for part {row.after + 1}, "
                                           "which was not answered"))
    if batches:  # the round's own phases, once
        mine = batches[0]["phases"]
        for name, value in phases.items():
            mine[name] = round(mine.get(name, 0.0) + value, 5)
    return batches
