"""The bounded queue and the one worker thread that owns the engine.

HTTP handlers put `Job`s into the queue (full -> 429). Whenever the worker is free it takes
everything waiting, up to `max_batch`, and hands it to the library's batch interface
(`Switch.run`), which decodes it in as few batched forwards as the requests allow. Requests that
arrive while a batch decodes join it between its steps (continuous batching, `continuous`; the
library asks `_arrivals`), as long as they fit it (same sampling settings...) and the batch has
rows free; the first that does not fit waits, and so does everything behind it, until the round
ends (first come, first served: a request never waits behind later ones that happen to fit). A
library change due between rounds also stops the joining, so the round drains and it runs. With
`continuous=False` every request that arrives during a round waits for the next one. Each
request's events come back through its handle and reach its HTTP handler's event loop
thread-safely.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from loraswitch.server import errors
from loraswitch.switch.request import Done, Event, Failed, Handle, Request, Started, Token

log = logging.getLogger("loraswitch.server")


@dataclass(eq=False)
class Job:
    """One HTTP request in the server: the library's handle (the immutable request, its events,
    its cancel flag) plus what the server measures. Events go to `queue` on `loop`."""

    handle: Handle
    loop: asyncio.AbstractEventLoop | None = None
    queue: asyncio.Queue | None = None
    metrics: object | None = None  # server.metrics.Metrics
    rows: int = 1  # batch rows it takes (a multi-part request: one per part)
    counts_prompt: bool = True  # False for the 2nd..nth sample of a prompt: its tokens are counted once
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    first_token: float | None = None
    finished: bool = False

    def __post_init__(self):
        self.handle.emit = self.on_event

    @property
    def request(self) -> Request:
        return self.handle.request

    @property
    def id(self) -> str:
        return self.handle.id

    def on_event(self, event: Event) -> None:
        """Called by the worker thread: time the request, count it, pass the event on."""
        now = time.monotonic()
        if isinstance(event, Started) and self.started is None:
            self.started = now
        elif isinstance(event, Token) and self.first_token is None and event.text:
            self.first_token = now
        elif isinstance(event, Done | Failed):
            self.finished = True
            if self.metrics is not None:
                try:
                    self.metrics.answered(self, event) if isinstance(event, Done) else self.metrics.failed()
                except Exception:  # metrics must never break serving
                    log.exception("metrics failed")
        self.deliver(event)

    def deliver(self, event: Event) -> None:
        if self.loop is not None and self.queue is not None:
            with contextlib.suppress(RuntimeError):  # the request's event loop is gone (shutting down)
                self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def cancel(self) -> None:
        if not self.finished and not self.handle.cancelled and self.metrics is not None:
            self.metrics.cancelled()
        self.handle.cancel()

    def timings(self) -> dict:
        """The response's `batch` timings: queue, generation and first-token milliseconds."""
        now = time.monotonic()
        started = self.started or now
        out = {"queue_ms": round(1000 * (started - self.submitted), 2), "generate_ms": round(1000 * (now - started), 2)}
        if self.first_token is not None:
            out["first_token_ms"] = round(1000 * (self.first_token - self.submitted), 2)
        return out


GATHER_MAX_S = 0.05  # the longest a round waits for requests still being prepared (`Scheduler.arriving`)


class Scheduler:
    """The bounded queue and the worker thread (see the module doc)."""

    def __init__(self, switch, max_batch: int = 32, max_queue: int = 256, metrics=None, max_parts: int | None = None,
                 gather_max_s: float = GATHER_MAX_S, continuous: bool = True):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self.switch = switch
        self.engine = switch.engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_parts = max_parts
        self.metrics = metrics
        self.gather_max_s = gather_max_s
        self.continuous = continuous
        self._arriving = 0  # requests the HTTP handlers are preparing (parsed, not yet queued)
        self._ops: list[tuple[Callable[[], object], Future]] = []  # run between rounds
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._paused = False
        self._stopping = False
        self._running: list[Job] = []
        self._unanswered: dict[int, Job] = {}  # id(handle) -> job taken and not yet answered (escalated)
        self._thread: threading.Thread | None = None
        self.stats = {"rounds": 0, "batches": 0, "rows": 0, "joined": 0, "max_batch_size": 0, "failed_batches": 0}
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
                job.handle.cancel()
            self._cv.notify_all()
        for job in pending:
            job.on_event(Failed(errors.unavailable("the server is shutting down")))
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cv:
            ops, self._ops = self._ops, []
        for fn, future in ops:  # library changes still owed: the worker is gone, run them here
            _settle(future, fn)

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
        """Jobs of the round under way, answered ones included (0: the round ended and was counted)."""
        return len(self._running)

    @property
    def answering(self) -> int:
        """Requests being answered now (what /healthz reports as running): a round keeps its jobs,
        and those that joined it, until it ends, so counting them made /healthz read 48 while at
        most 24 requests were in flight."""
        return sum(1 for j in self._running if not j.finished and not j.handle.cancelled)

    # ------------------------------------------------------------------ requests
    def submit(self, job: Job) -> None:
        """Queue `job`; raises APIError 429 when the queue is full, 503 when stopping."""
        self.submit_all([job])

    def submit_all(self, jobs: list[Job]) -> None:
        """Queue the choices of one request together, or none of them: APIError 429 when the
        queue has no room for all, 503 when stopping."""
        with self._cv:
            if self._stopping:
                raise errors.unavailable("the server is shutting down")
            if len(self._queue) + len(jobs) > self.max_queue:
                raise errors.queue_full(len(self._queue))
            now = time.monotonic()
            for job in jobs:
                job.submitted = now
                self._queue.append(job)
            self._cv.notify()

    def requeue(self, handle) -> None:
        """Put back, first in line, a request whose upstream failed (`Switch.run`'s `requeue`):
        it is answered locally in the next round, while the worker never waited for the upstream."""
        with self._cv:
            job = self._unanswered.get(id(handle))
            if job is not None and not self._stopping:
                self._queue.appendleft(job)
                self._cv.notify()
                return
        if job is not None:
            job.on_event(Failed(errors.unavailable("the server is shutting down")))

    def cancel(self, job: Job) -> None:
        """Drop `job`: unqueue it, or make its rows leave the batch at their next token."""
        job.cancel()
        with self._cv, contextlib.suppress(ValueError):
            self._queue.remove(job)

    # ------------------------------------------------------------------ the worker
    def call_between_rounds(self, fn: Callable[[], object]) -> Future:
        """Run `fn` in the worker thread when no batch is decoding (library changes: an adapter
        removed mid-batch changed the answers of `auto` rows already routed to it). The future
        completes when it has run; a stopped scheduler runs it at once."""
        future: Future = Future()
        with self._cv:
            if self.alive and not self._stopping:
                self._ops.append((fn, future))
                self._cv.notify_all()
                return future
        _settle(future, fn)
        return future

    def _take(self) -> list[Job] | None:
        with self._cv:
            while not self._stopping and not self._ops and (self._paused or not self._queue):
                self._cv.wait()
            self._gather()
            if self._stopping:
                return None
            ops, self._ops = self._ops, []
            jobs: list[Job] = []
            rows = 0
            while not ops and self._queue and (not jobs or rows + self._queue[0].rows <= self.max_batch) \
                    and not self._paused:
                job = self._queue.popleft()
                if not job.handle.cancelled:
                    jobs.append(job)
                    rows += job.rows
            self._running = jobs
            self._unanswered = {k: j for k, j in self._unanswered.items() if not (j.finished or j.handle.cancelled)}
            self._unanswered.update((id(j.handle), j) for j in jobs)
        for fn, future in ops:
            _settle(future, fn)
        return jobs

    def _arrivals(self, rows: int, fits: Callable[[Request], bool]) -> list:
        """Waiting requests for the running batch (`Switch.run`'s `arrivals`): from the head of the
        queue, at most `rows` rows, while each `fits`; none while paused, stopping or a library
        change waits for the round to end."""
        with self._cv:
            jobs: list[Job] = []
            if self._paused or self._stopping or self._ops:
                return []
            while self._queue and rows >= self._queue[0].rows + sum(j.rows for j in jobs) \
                    and fits(self._queue[0].request):
                job = self._queue.popleft()
                if not job.handle.cancelled:
                    jobs.append(job)
            self._running = self._running + jobs  # a new list: stop() and the round read it
            self._unanswered.update((id(j.handle), j) for j in jobs)
        return [j.handle for j in jobs]

    def _gather(self) -> None:
        """Wait, inside the condition, for the requests the handlers are still preparing. They reach
        the queue one by one (each is validated and tokenized in the one `prep` thread first), so
        a worker that took what was there the moment the first arrived gave it a round of its own
        and made the rest of the burst wait for that whole round (issue 17's profile: 32 streamed
        requests sent at once became a batch of 1 and one of 31, whose first tokens came ~0.5 s
        later). Waits at most `gather_max_s`, only while some are announced (`arriving`): a lone
        request never waits, and never once max_batch rows are queued."""
        deadline = time.monotonic() + self.gather_max_s
        while self._arriving > 0 and self._queue and not (self._ops or self._paused or self._stopping):
            if sum(j.rows for j in self._queue) >= self.max_batch:
                return
            wait = deadline - time.monotonic()
            if wait <= 0:
                return
            self._cv.wait(wait)

    @contextlib.contextmanager
    def arriving(self):
        """Announce a request from its arrival until it is queued (or refused): a round about to
        start waits for it (`_gather`)."""
        with self._cv:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cv:
                self._arriving -= 1
                self._cv.notify_all()

    def _run(self) -> None:
        while (jobs := self._take()) is not None:
            try:
                if jobs:
                    self._round(jobs)
            except Exception:  # never let the worker die: fail this round, keep serving
                log.exception("scheduler round failed")
                with self._cv:
                    jobs = list(self._running)  # joined ones included
                for job in jobs:
                    if not job.finished:
                        job.on_event(Failed(errors.server_error("internal error while generating")))
            finally:
                with self._cv:
                    self._running = []

    def _round(self, jobs: list[Job]) -> None:
        self.stats["rounds"] += 1
        began = time.perf_counter()
        batches = self.switch.run([j.handle for j in jobs], max_rows=self.max_batch, max_parts=self.max_parts,
                                  requeue=self.requeue, arrivals=self._arrivals if self.continuous else None)
        seconds = time.perf_counter() - began
        phases: dict[str, float] = {}
        for info in batches:
            for name, value in (info.get("phases") or {}).items():
                phases[name] = phases.get(name, 0.0) + value
            self.stats["batches"] += 1
            self.stats["rows"] += info["size"]
            self.stats["joined"] += info.get("joined", 0)
            self.stats["failed_batches"] += int(info.get("failed", False))
            self.stats["max_batch_size"] = max(self.stats["max_batch_size"], info["size"])
            self.recent.append(info)
            if self.metrics is not None:
                self.metrics.batch(info["size"])
        if self.metrics is not None:
            self.metrics.round(seconds, phases)
            with self._cv:
                answered = list(self._running)  # the round's jobs and those that joined it
            for job in answered:
                self.metrics.queued((job.started or time.monotonic()) - job.submitted)


def _settle(future: Future, fn: Callable[[], object]) -> None:
    try:
        future.set_result(fn())
    except Exception as exc:  # the caller reads it from the future
        future.set_exception(exc)
