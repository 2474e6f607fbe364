"""Escalation inside `Switch.run`: which requests of a batch go upstream, answering them there
while the local rows decode, and answering locally the ones the upstream failed.

Only routed requests (`model="auto"`) are candidates: naming an adapter or "base" is a request
for *this* model. `split` scores the candidates in one router pass (`switch.escalation`), starts
the escalated ones on a thread pool (their events flow as the upstream streams) and returns the
handles to decode here; `settle` waits for the upstream answers, then the caller decodes the
failed ones locally, with the failure in their routing (`escalation.fallback`) instead of an
error: an upstream that is down costs quality, never an answer.

Every answer of a switch with an upstream carries `routing.target` ("adapter", "base" or
"upstream") and `routing.escalation` (risk, threshold, the local alternative and why).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from loraswitch.generate import Generation
from loraswitch.switch.escalation import DEFAULT_THRESHOLD, Verdict, assess, risks, threshold_for_rate
from loraswitch.switch.request import Done, Event, Handle
from loraswitch.switch.upstream import Upstream, UpstreamError

log = logging.getLogger("loraswitch.escalate")
Requeue = Callable[[Handle], None]


@dataclass(eq=False)
class Escalator:
    """An upstream and the threshold that sends requests to it (`calibrate` sets it for a rate)."""

    upstream: Upstream
    threshold: float = DEFAULT_THRESHOLD
    rate: float | None = None  # the target escalation rate the threshold was calibrated for
    calibrated_on: int = 0  # calibration prompts
    workers: int = 16  # upstream requests in flight at once
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self):
        if not (isinstance(self.threshold, (int, float)) and self.threshold >= 0):  # NaN fails too
            raise ValueError(f"an escalation threshold is a risk >= 0 (above 1: never), not {self.threshold!r}")

    def calibrate(self, switch, prompts: list[str], rate: float, route: str | None = None) -> float:
        """Set the threshold so that `rate` of `prompts` (held-out, like the traffic) escalate."""
        self.threshold = threshold_for_rate(risks(switch, prompts, route), rate)
        self.rate, self.calibrated_on = rate, len(prompts)
        return self.threshold

    def describe(self) -> dict:
        return {**self.upstream.describe(), "threshold": round(self.threshold, 4), "rate": self.rate,
                "calibrated_on": self.calibrated_on}

    @property
    def pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="loraswitch-upstream")
            return self._pool

    # ------------------------------------------------------------------ inside Switch.run
    def split(self, switch, handles: list[Handle], requeue: Requeue | None = None
              ) -> tuple[list[Handle], list[tuple[Handle, Future]]]:
        """(handles to decode here, (handle, future) of those sent upstream). Every routed handle
        decoded here reports its verdict in its answer's routing. `requeue` (a server's): where a
        handle whose upstream failed goes, the moment it fails, to be decoded in a later round."""
        by_route: dict[str | None, list[Handle]] = {}
        for h in handles:
            if isinstance(h.emit, _Annotated) and h.emit.fallback:  # back from a failed upstream
                continue
            if h.request.model == "auto" and not h.cancelled:
                by_route.setdefault(h.request.route, []).append(h)
        sent: list[tuple[Handle, Future]] = []
        for route, group in by_route.items():
            try:
                reqs = [h.request.tokenized(switch.base) for h in group]
                verdicts = assess(switch, [r.route_text(switch.base) for r in reqs], [list(r.prompt_ids) for r in reqs],
                                  route, self.threshold)
            except Exception:  # the router is unavailable or the template refuses: `run` reports it
                log.exception("scoring requests for escalation failed; they are answered locally")
                continue
            for h, req, verdict in zip(group, reqs, verdicts):
                h.request = req
                refused = self.upstream.accepts(req) if verdict.target == "upstream" else None
                if refused:
                    verdict.target = verdict.local
                    verdict.reason += f"; kept local: {refused}"
                h.emit = _Annotated(h.emit, verdict)
                if verdict.target == "upstream":
                    future = self.pool.submit(self._ask, h, verdict, switch.base)
                    if requeue is not None:
                        future.add_done_callback(lambda f, h=h: _hand_back(h, f, requeue))
                    sent.append((h, future))
        gone = {id(h) for h, _ in sent}
        return [h for h in handles if id(h) not in gone], sent

    def _ask(self, handle: Handle, verdict: Verdict, base) -> Generation:
        answer = self.upstream.answer(handle.request, handle.emit, lambda: handle.cancelled)
        info = answer.routing["upstream"]
        if not info.get("usage"):  # an upstream that reports none (or broke first): counted here
            info["usage"] = {"prompt_tokens": len(handle.request.prompt_ids or ()),
                             "completion_tokens": len(base.tokenizer.encode(answer.text, add_special_tokens=False)),
                             "estimated": "counted with this server's tokenizer (the upstream reported none)"}
        answer.routing = {"router": "escalation", "adapter": None, "confidence": round(1.0 - verdict.risk, 4),
                          "target": "upstream", "reason": verdict.reason, "escalation": verdict.to_dict(),
                          "upstream": info}
        answer.events = [{"token_index": 0, "event": "escalate", "adapter": None, "risk": round(verdict.risk, 4),
                          "upstream": info["model"]}]
        if not handle.cancelled:
            handle.emit(Done(answer, {"id": None, "size": 1, "dynamic": False, "upstream": True}))
        return answer

    def settle(self, sent: list[tuple[Handle, Future]]) -> list[Handle]:
        """Wait for the upstream answers; the handles whose upstream failed before passing on any
        text, annotated with why, to be answered locally."""
        return [h for h, future in sent if _failed(h, future)]


def _hand_back(handle: Handle, future: Future, requeue: Requeue) -> None:
    if _failed(handle, future) and not handle.cancelled:
        requeue(handle)


def _failed(handle: Handle, future: Future) -> bool:
    """Whether `future` (an upstream answer) failed; if so, `handle`'s emit notes why."""
    try:
        future.result()
        return False
    except UpstreamError as exc:
        why = f"upstream failed, answered locally: {exc}"
    except Exception as exc:  # a bug here must not cost the request its answer either
        log.exception("escalating a request failed")
        why = f"escalation failed, answered locally: {type(exc).__name__}: {exc}"
    if isinstance(handle.emit, _Annotated):
        handle.emit.fallback = why
    return True


@dataclass(eq=False)
class _Annotated:
    """A handle's emit that adds the escalation verdict to the routing of a local `Done` (an
    upstream answer carries its own)."""

    emit: object
    verdict: Verdict
    fallback: str | None = None  # why the upstream did not answer a request sent to it

    def __call__(self, event: Event) -> None:
        if isinstance(event, Done) and event.answer.routing.get("target") != "upstream":
            routing = event.answer.routing
            # what answered, not what the verdict expected: allow / deny can leave the router's
            # pick out, and a part-by-part answer names its parts' adapters
            chosen = routing.get("adapter")
            local = "adapter" if (any(chosen) if isinstance(chosen, list) else chosen) else "base"
            routing["target"] = local
            routing["escalation"] = {**self.verdict.to_dict(), "target": local,
                                     **({"decided": "upstream", "fallback": self.fallback} if self.fallback else {})}
        self.emit(event)  # type: ignore[operator]
