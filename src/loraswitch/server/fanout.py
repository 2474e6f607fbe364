"""A request whose prompt mixes tasks, served part by part (`model="auto"`).

The scheduler replaces such a request (the parent) by one child job per numbered part: the
conversation with its last user turn replaced by the part, routed on the part's own words. The
children are ordinary rows of the batch: they decode together with everything else in flight.
`PartsRequest` is the children's sink: it streams part 1 as it is written, holds later parts'
text back until the parts before them are done (then flushes it behind "\\n2. "), and answers the
parent once every part is done, with the answer, trace and switch events assembled by the same
`routing.segments.assemble` the library and the evaluation use.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from loraswitch.routing.segments import PartAnswer, assemble, part_budget, separator, separator_ids

if TYPE_CHECKING:
    from loraswitch.server.scheduler import Job, JobResult, Scheduler


class PartsRequest:
    """The parent request of `len(parts)` child jobs (see the module doc)."""

    def __init__(self, parent: Job, parts: list[str], scheduler: Scheduler):
        from loraswitch.server.scheduler import Job

        self.parent = parent
        self.scheduler = scheduler
        self.tok = scheduler.engine.base.tokenizer
        self.lock = threading.Lock()  # children report from the worker thread only, but stay safe
        n = len(parts)
        self.children: list[Job] = [
            Job(prompt_ids=parent.part_prompt(text), route_text=text, model="auto", route=parent.route,
                max_tokens=part_budget(parent.max_tokens, n), temperature=parent.temperature, top_p=parent.top_p,
                seed=parent.seed, stop=list(parent.stop), stream=parent.stream, trace=parent.trace,
                id=f"{parent.id}-{k}", submitted=parent.submitted, parent=parent)
            for k, text in enumerate(parts, 1)
        ]
        for k, child in enumerate(self.children):
            child.sink = self._sink(k)
        self.sep_ids = [separator_ids(self.tok, k) for k in range(1, n + 1)]  # as `assemble` writes them
        self.results: list[JobResult | None] = [None] * n
        self.pending: list[list[dict]] = [[] for _ in range(n)]  # deltas held back, per part
        self.opened = [False] * n  # the part's separator has been streamed
        self.current = 0  # the part being streamed
        self.offset = 0  # assembled token index where the current part's separator starts
        self.started = False
        parent.state = "running"

    def _sink(self, k: int):
        return lambda kind, payload: self.on_event(k, kind, payload)

    # ------------------------------------------------------------------ children's events
    def on_event(self, k: int, kind: str, payload: Any) -> None:
        with self.lock:
            if self.parent.finished:
                return
            if kind == "start":
                if not self.started:
                    self.started = True
                    self.parent.started = self.children[k].started
                    self.parent.deliver("start", {**payload, "fan_out": len(self.children)})
            elif kind == "delta":
                if k == self.current:
                    self._stream(k, payload)
                else:
                    self.pending[k].append(payload)
            elif kind == "done":
                self.results[k] = payload
                while self.current < len(self.children) and self.results[self.current] is not None:
                    self._close_current()
                if self.current == len(self.children):
                    self._answer()
            elif kind == "error":
                self.parent.finished = True
                self.parent.state = "failed"
                for child in self.children:
                    child.cancelled = True
                self.parent.deliver("error", payload)
                self.scheduler.metrics_call("job_failed", self.parent, payload)

    def _stream(self, k: int, delta: dict) -> None:
        if not self.parent.stream:
            return
        sep, first = separator(k + 1), not self.opened[k]
        self.opened[k] = True
        out: dict[str, Any] = {"text": (sep if first else "") + delta["text"]}
        if self.parent.trace:  # token pieces renumbered to the assembled answer
            n_sep = len(self.sep_ids[k])
            pieces = [{**p, "index": self.offset + n_sep + p["index"], "part": k + 1} for p in delta.get("tokens", [])]
            if first:
                pieces.insert(0, {"index": self.offset, "text": sep, "adapters": {}, "part": k + 1, "separator": True})
            out["tokens"] = pieces
        self.parent.deliver("delta", out)

    def _close_current(self) -> None:
        """The streamed part is done: make sure its separator went out, move to the next part and
        flush what it already wrote."""
        k = self.current
        if self.parent.stream and not self.opened[k]:
            self._stream(k, {"text": ""})
        res = self.results[k]
        self.offset += len(self.sep_ids[k]) + len(res.token_ids)
        self.current += 1
        if self.current < len(self.children):
            for delta in self.pending[self.current]:
                self._stream(self.current, delta)
            self.pending[self.current] = []

    # ------------------------------------------------------------------ the answer
    def _answer(self) -> None:
        from loraswitch.server.scheduler import JobResult, answered_adapters, token_trace, tokens_by_adapter

        parent = self.parent
        parts = [PartAnswer(r.text, r.token_ids, c.entries[: len(r.token_ids)], r.routing, r.finish_reason)
                 for r, c in zip(self.results, self.children)]
        whole = assemble(self.tok, parts, "auto", parent.prompt_ids)
        summary = whole.routing
        adapters = answered_adapters("auto", summary)
        routing: dict[str, Any] = {
            "requested": "auto", **summary, "adapters": adapters, "events": whole.events,
            "tokens_by_adapter": tokens_by_adapter(whole.trace),
        }
        if parent.route:
            routing["route"] = parent.route
        if parent.trace:
            routing["trace"] = token_trace(self.tok, whole.token_ids, whole.trace)
        first = self.results[0]
        batch = {**first.batch, "fan_out": len(parts), "batches": sorted({r.batch.get("id") for r in self.results})}
        result = JobResult(
            text=whole.text, token_ids=whole.token_ids, finish_reason=whole.finish_reason,
            prompt_tokens=len(parent.prompt_ids), completion_tokens=len(whole.token_ids),
            model="+".join(adapters) or "base", routing=routing, batch=batch,
        )
        parent.finished = True
        parent.state = "done"
        parent.token_ids = list(whole.token_ids)
        parent.deliver("done", result)
        self.scheduler.metrics_call("job_done", parent, result)
