"""The scheduler: one worker thread owns the engine and decodes waiting requests together.

Requests (`Job`s) enter a bounded queue (full -> the HTTP layer answers 429). Whenever the worker
is free it takes everything waiting, up to `max_batch`, and runs as few `generate` calls as it
can for them (dynamic batching: requests that arrive while a batch decodes wait for the next
one; a batch never grows once started):

* rows must share sampling settings (`generate` samples a whole batch with one set): greedy
  requests all batch together, sampled ones by (temperature, top_p), and a *seeded* sampled
  request runs alone so that its seed reproduces its answer whatever else is in flight;
* within those, rows routed by static policies (explicit adapters, `base`, sequence-level
  routing, part-by-part switching) share one forward through `RowsPolicy`; a per-layer router
  (Arrow, gates: `policy.dynamic`) gets a forward of its own, shared by all of its rows.

Per-request limits ride on the policy's `override` hook: a row that reached its own `max_tokens`,
hit one of its stop strings, or was cancelled (timeout, client gone) is handed an end-of-turn
token and leaves the batch; each request is answered the moment its row finishes, not when the
whole batch does. Streaming text is decoded incrementally, holding back any tail that could be the
start of a stop string, and each piece is attributed to the token (and adapters) that wrote it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loraswitch.generate import Policy, SamplingParams, generate
from loraswitch.library import AdapterError
from loraswitch.server import errors
from loraswitch.server.policy import RowsPolicy

log = logging.getLogger("loraswitch.server")

Sink = Callable[[str, Any], None]  # (kind, payload) -> delivered to the request's event loop


@dataclass
class JobResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    model: str  # the adapter(s) that answered, "+"-joined, or "base"
    routing: dict  # router summary, events, adapters, optional trace
    batch: dict  # {"id", "size", "queue_ms", ...}


@dataclass(eq=False)
class Job:
    """One request's generation: what to run, and (worker side) how far it got."""

    prompt_ids: list[int]
    route_text: str  # what a router reads: the last user message, or the completion prompt
    model: str = "base"  # "auto" | "base" | adapter name
    route: str | None = None  # router for model="auto" (None: the default "auto")
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    trace: bool = False
    sink: Sink | None = None
    # builds a part's prompt ids (the conversation with the part as its last user turn); set by
    # the HTTP layer, it lets model="auto" answer a prompt of numbered parts part by part
    part_prompt: Callable[[str], list[int]] | None = None
    parent: Job | None = None  # set on the part jobs of such a request (`server.fanout`)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    submitted: float = field(default_factory=time.monotonic)
    # worker side
    state: str = "new"  # new | queued | running | done | failed | cancelled
    cancelled: bool = False
    finished: bool = False
    token_ids: list[int] = field(default_factory=list)
    entries: list[dict] = field(default_factory=list)  # trace entry of each emitted token
    ends: list[int] = field(default_factory=list)  # end offset of each token's text in `text`
    text: str = ""  # decoded text so far (without an unfinished UTF-8 tail)
    sent: int = 0  # characters already streamed
    scanned: int = 0  # where the next stop-string search may start
    piece_tok: int = 0  # first token whose text is not fully streamed yet
    batch: dict = field(default_factory=dict)
    started: float | None = None
    first_token: float | None = None

    @property
    def gone(self) -> bool:
        """Cancelled, itself or through the request it is a part of."""
        return self.cancelled or (self.parent is not None and self.parent.cancelled)

    @property
    def sampling_key(self) -> tuple:
        if self.temperature <= 0:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", self.id)
        return ("sample", float(self.temperature), float(self.top_p))

    @property
    def policy_key(self) -> tuple[str, str | None]:
        return (self.model, self.route if self.model == "auto" else None)

    def deliver(self, kind: str, payload: Any) -> None:
        if self.sink is None:
            return
        with contextlib.suppress(RuntimeError):  # the request's event loop is gone (shutting down)
            self.sink(kind, payload)


def _holdback(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def answered_adapters(model: str, summary: dict) -> list[str]:
    """The adapters that answered, from a policy summary (explicit policies have none)."""
    chosen = summary.get("adapter", None if model == "base" else model)
    items = chosen if isinstance(chosen, list) else [chosen]
    out: list[str] = []
    for a in items:
        if a and a != "base" and a not in out:
            out.append(a)
    return out


def tokens_by_adapter(entries: list[dict]) -> dict[str, int]:
    """How many generated tokens each adapter (its top weight) wrote; "base" for none. Part
    separators of a multi-part answer were written by nobody and are not counted."""
    return dict(Counter((max(e["adapters"], key=e["adapters"].get) if e.get("adapters") else "base")
                        for e in entries if not e.get("separator")))


def token_trace(tok, token_ids: list[int], entries: list[dict]) -> list[dict]:
    """The response's per-token trace: index, token id and text, and the token's routing entry."""
    pieces = tok.convert_ids_to_tokens(token_ids)
    return [{"index": i, "token_id": t, "token": tok.convert_tokens_to_string([p]) if p is not None else "",
             **{k: v for k, v in e.items() if k not in ("token_id", "token")}}
            for i, (t, p, e) in enumerate(zip(token_ids, pieces, entries))]


class BatchPolicy(RowsPolicy):
    """`RowsPolicy` plus the per-request bookkeeping of one `generate` call: per-row token
    limits, stop strings, cancellation, streaming deltas, and answering each row as it ends."""

    def __init__(self, parts: list[tuple[Policy, int]], jobs: list[Job], scheduler: Scheduler):
        super().__init__(parts, len(jobs))
        self.jobs = jobs
        self.scheduler = scheduler
        self.engine = scheduler.engine
        self.tok = self.engine.base.tokenizer
        self.stop_ids = self.engine.base.eos_ids
        self.end_token = min(self.stop_ids)

    # ------------------------------------------------------------------ generate's hooks
    def override(self, row: int, generated: list[int], token: int) -> int:
        job = self.jobs[row]
        if job.finished:
            return self.end_token
        if job.gone:
            self.finish(row, "cancelled")
            return self.end_token
        token = super().override(row, generated, token)
        if token in self.stop_ids:
            self.finish(row, "stop")
        return token

    def on_token(self, row: int, token: int, entry: dict) -> None:
        job = self.jobs[row]
        if job.finished:
            return
        job.token_ids.append(token)
        job.entries.append(entry)
        if job.first_token is None:
            job.first_token = time.monotonic()
        if job.stream or job.stop:
            full = self.tok.decode(job.token_ids, skip_special_tokens=True)
            stable = full.rstrip("\ufffd")  # a character still missing bytes waits for the next token
            stable = stable if len(stable) >= len(job.text) else job.text
            job.text = stable
            job.ends.append(len(stable))
            if job.stop:
                start = max(0, job.scanned - max(len(s) for s in job.stop) + 1)
                hits = [p for p in (stable.find(s, start) for s in job.stop) if p >= 0]
                if hits:
                    self.finish(row, "stop", text=stable[: min(hits)])
                    return
                job.scanned = len(stable)
            if job.stream:
                limit = len(stable) - _holdback(stable, job.stop)
                if limit > job.sent:
                    self._emit(job, stable, limit)
        if len(job.token_ids) >= job.max_tokens:
            self.finish(row, "length")

    # ------------------------------------------------------------------ answering
    def _emit(self, job: Job, text: str, upto: int) -> None:
        delta: dict[str, Any] = {"text": text[job.sent : upto]}
        if job.trace:
            delta["tokens"] = self._pieces(job, text, job.sent, upto)
        job.sent = upto
        job.deliver("delta", delta)

    def _pieces(self, job: Job, text: str, a: int, b: int) -> list[dict]:
        """The text [a, b) cut at token boundaries, each piece with its token's routing."""
        out, i, n = [], job.piece_tok, len(job.ends)
        while i < n:
            lo = job.ends[i - 1] if i > 0 else 0
            hi = job.ends[i] if i < n - 1 else max(job.ends[i], b)  # the last token takes any tail
            if lo >= b:
                break
            s, e = max(lo, a), min(hi, b)
            if e > s:
                extra = {k: v for k, v in job.entries[i].items() if k not in ("token_id", "adapters")}
                out.append({"index": i, "text": text[s:e], "adapters": job.entries[i].get("adapters", {}), **extra})
            if hi > b:
                break
            i += 1
        job.piece_tok = i
        return out

    def finish(self, row: int, reason: str, text: str | None = None) -> None:
        job = self.jobs[row]
        if job.finished:
            return
        job.finished = True
        if reason == "cancelled":
            job.state = "cancelled"
            self.scheduler.metrics_call("job_cancelled", job)
            return
        final = text if text is not None else self.tok.decode(job.token_ids, skip_special_tokens=True)
        if job.stream and len(final) > job.sent:
            if not job.ends:  # nothing decoded incrementally (cannot happen with stream=True)
                job.ends = [len(final)] * len(job.token_ids)
            self._emit(job, final, len(final))
        result = self._result(row, job, final, "stop" if reason == "stop" else "length")
        job.state = "done"
        job.deliver("done", result)
        self.scheduler.metrics_call("job_done", job, result)

    def _result(self, row: int, job: Job, text: str, finish_reason: str) -> JobResult:
        policy, local = self.locate(row)
        summary = policy.summary(self.engine, local) or {}
        events = policy.events(local)
        adapters = answered_adapters(job.model, summary)
        routing: dict[str, Any] = {
            "requested": job.model,
            "router": summary.get("router"),
            "adapter": summary.get("adapter", None if job.model == "base" else job.model),
            "confidence": summary.get("confidence", 1.0),
            **{k: v for k, v in summary.items() if k not in ("router", "adapter", "confidence")},
            "adapters": adapters,
            "events": events,
            "tokens_by_adapter": tokens_by_adapter(job.entries),
        }
        if job.model == "auto" and job.route:
            routing["route"] = job.route
        if job.trace:
            routing["trace"] = token_trace(self.tok, job.token_ids, job.entries)
        now = time.monotonic()
        batch = dict(job.batch)
        batch["queue_ms"] = round(1000 * ((job.started or now) - job.submitted), 2)
        batch["generate_ms"] = round(1000 * (now - (job.started or now)), 2)
        if job.first_token is not None:
            batch["first_token_ms"] = round(1000 * (job.first_token - job.submitted), 2)
        return JobResult(
            text=text, token_ids=list(job.token_ids), finish_reason=finish_reason, prompt_tokens=len(job.prompt_ids),
            completion_tokens=len(job.token_ids), model="+".join(adapters) or "base", routing=routing, batch=batch,
        )


class Scheduler:
    """The bounded queue and the worker thread that owns the engine (see the module doc)."""

    def __init__(self, switch, max_batch: int = 32, max_queue: int = 256, metrics=None):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self.switch = switch
        self.engine = switch.engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._paused = False
        self._stopping = False
        self._running: list[Job] = []
        self._batch_ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self.stats = {"rounds": 0, "batches": 0, "rows": 0, "max_batch_size": 0, "failed_batches": 0}
        self.recent: deque[dict] = deque(maxlen=64)  # the last batches: id, size, models, seconds

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="loraswitch-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new work, fail what is still queued (503), cut running rows short, join."""
        with self._cv:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            for job in self._running:
                job.cancelled = True
            self._cv.notify_all()
        for job in pending:
            job.state = "failed"
            job.deliver("error", errors.unavailable("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def pause(self) -> None:
        """Hold the queue (requests wait, nothing is taken): maintenance and tests."""
        with self._cv:
            self._paused = True

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._running)

    # ------------------------------------------------------------------ requests
    def submit(self, job: Job) -> None:
        """Queue `job`; raises APIError 429 when the queue is full, 503 when stopping."""
        with self._cv:
            if self._stopping:
                raise errors.unavailable("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise errors.queue_full(len(self._queue))
            job.state = "queued"
            job.submitted = time.monotonic()
            self._queue.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """Drop `job`: unqueue it, or make its row leave the batch at the next token."""
        job.cancelled = True
        with self._cv:
            try:
                self._queue.remove(job)
            except ValueError:
                return
            job.state = "cancelled"
        self.metrics_call("job_cancelled", job)

    def metrics_call(self, method: str, *args) -> None:
        job = args[0] if args and isinstance(args[0], Job) else None
        if job is not None and job.parent is not None and method.startswith("job_"):
            return  # a part of a request: the request itself is counted when it is answered
        if self.metrics is not None:
            try:
                getattr(self.metrics, method)(*args)
            except Exception:  # metrics must never break serving
                log.exception("metrics %s failed", method)

    # ------------------------------------------------------------------ the worker
    def _take(self) -> list[Job] | None:
        with self._cv:
            while not self._stopping and (self._paused or not self._queue):
                self._cv.wait()
            if self._stopping:
                return None
            jobs: list[Job] = []
            while self._queue and len(jobs) < self.max_batch:
                job = self._queue.popleft()
                if not job.gone:
                    jobs.append(job)
            self._running = jobs
            return jobs

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            try:
                if jobs:
                    self._round(jobs)
            except Exception:  # never let the worker die: fail this round, keep serving
                log.exception("scheduler round failed")
                self._fail(jobs, errors.server_error("internal error while generating"))
            finally:
                with self._cv:
                    self._running = []

    def _fail(self, jobs: list[Job], error: errors.APIError) -> None:
        for job in jobs:
            if not job.finished:
                job.finished = True
                job.state = "failed"
                job.deliver("error", error)
                self.metrics_call("job_failed", job, error)

    def _fan_out(self, jobs: list[Job]) -> list[Job]:
        """Requests for `auto` whose prompt has numbered parts become one job per part."""
        from loraswitch.routing.segments import split_parts
        from loraswitch.server.fanout import PartsRequest

        out: list[Job] = []
        for job in jobs:
            parts = split_parts(job.route_text) if job.model == "auto" and job.part_prompt is not None else None
            if parts:
                try:
                    fans = self.switch.router(job.route or "auto").fans_out
                except Exception:  # the router is unavailable: `_policies` answers with the reason
                    fans = False
                if fans:
                    out += PartsRequest(job, parts, self).children
                    continue
            out.append(job)
        return out

    def _round(self, jobs: list[Job]) -> None:
        self.stats["rounds"] += 1
        jobs = self._fan_out(jobs)
        by_sampling: dict[tuple, list[Job]] = {}
        for job in jobs:
            by_sampling.setdefault(job.sampling_key, []).append(job)
        for group in by_sampling.values():
            with self.engine.pin():  # adapters removed from now on stay valid for these rows
                parts = self._policies(group)
                static = [p for p in parts if p[0].dynamic is None]
                calls = ([static] if static else []) + [[p] for p in parts if p[0].dynamic is not None]
                for call in calls:
                    self._generate(call)

    def _policies(self, group: list[Job]) -> list[tuple[Policy, list[Job]]]:
        """One policy per (model, router) over all of its rows (routers decide in one batch)."""
        from loraswitch.routing.seq import StaleRouterError

        by_policy: dict[tuple, list[Job]] = {}
        for job in group:
            by_policy.setdefault(job.policy_key, []).append(job)
        out = []
        for (model, route), members in by_policy.items():
            try:
                policy = self.switch.policy([j.route_text for j in members], model, route)
            except AdapterError as exc:
                self._fail(members, errors.model_not_found(model, ["auto", "base", *self.engine.names])
                           if exc.name == model else errors.bad_request(str(exc), "model", "invalid_adapter"))
                continue
            except (StaleRouterError, FileNotFoundError, ValueError) as exc:
                self._fail(members, errors.bad_request(f"router {route or 'auto'!r} is unavailable: {exc}", "route",
                                                       "router_unavailable"))
                continue
            except Exception as exc:
                log.exception("building the routing policy failed")
                self._fail(members, errors.server_error(f"routing failed: {exc}"))
                continue
            out.append((policy, members))
        return out

    def _generate(self, call: list[tuple[Policy, list[Job]]]) -> None:
        jobs = [j for _, members in call for j in members]
        parts, offset = [], 0
        for policy, members in call:
            parts.append((policy, offset))
            offset += len(members)
        batch_policy = BatchPolicy(parts, jobs, self)
        lead = jobs[0]
        params = SamplingParams(
            max_new_tokens=max(j.max_tokens for j in jobs),
            temperature=max(lead.temperature, 0.0), top_p=lead.top_p, seed=lead.seed,
        )
        batch_id = next(self._batch_ids)
        now = time.monotonic()
        info = {"id": batch_id, "size": len(jobs), "dynamic": batch_policy.dynamic is not None}
        for job in jobs:
            job.state = "running"
            job.started = now
            job.batch = dict(info)
            job.deliver("start", dict(info))
        self.stats["batches"] += 1
        self.stats["rows"] += len(jobs)
        self.stats["max_batch_size"] = max(self.stats["max_batch_size"], len(jobs))
        self.metrics_call("batch_started", jobs)
        try:
            results = generate(self.engine, [j.prompt_ids for j in jobs], batch_policy, params,
                               on_token=batch_policy.on_token)
        except Exception as exc:
            log.exception("batch %d failed", batch_id)
            self.stats["failed_batches"] += 1
            self._fail(jobs, errors.server_error(f"generation failed: {type(exc).__name__}: {exc}"))
            results = None
        if results is not None:
            for row, (job, res) in enumerate(zip(jobs, results)):
                if not job.finished:  # defensive: every row normally finished inside generate
                    job.token_ids, job.entries = list(res.token_ids), [
                        {k: v for k, v in e.items() if k != "token"} for e in res.trace[: len(res.token_ids)]]
                    job.ends = []
                    batch_policy.finish(row, res.finish_reason)
        self.recent.append({**info, "models": sorted({j.model for j in jobs}),
                            "seconds": round(time.monotonic() - now, 4)})
