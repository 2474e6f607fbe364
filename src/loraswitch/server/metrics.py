"""Prometheus metrics, one registry per app (tests build many apps in one process)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from loraswitch.server.routing_info import answered_adapters, tokens_by_adapter

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/models": "models",
    "/v1/adapters": "adapters",
    "/healthz": "healthz",
    "/metrics": "metrics",
}
CONTENT_TYPE = CONTENT_TYPE_LATEST
MAX_ADAPTER_LABELS = 256  # distinct adapter label values; more are counted as "other"


def endpoint_label(path: str) -> str:
    """A bounded label for a request path (unknown paths are "other")."""
    if path in ENDPOINTS:
        return ENDPOINTS[path]
    if path.startswith("/v1/adapters/"):
        return "adapters"
    if path.startswith("/v1/models/"):
        return "models"
    if path == "/ui" or path.startswith("/ui/"):
        return "ui"
    return "other"


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: half the exposition, never read
        self.registry = r = CollectorRegistry()
        self.requests = Counter("loraswitch_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("loraswitch_request_latency_seconds", "HTTP request latency (streams: until the last byte).",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("loraswitch_prompt_tokens", "Prompt tokens of answered requests.", registry=r)
        self.completion_tokens = Counter("loraswitch_completion_tokens", "Generated tokens of answered requests.",
                                         registry=r)
        self.generations = Counter("loraswitch_generations", "Finished generations by outcome.", ["outcome"], registry=r)
        self.routed = Counter("loraswitch_routed_requests", "Answered requests by the adapter that answered (base = none).",
                              ["adapter", "requested"], registry=r)
        self.adapter_tokens = Counter("loraswitch_adapter_tokens", "Generated tokens by the adapter with the most weight.",
                                      ["adapter"], registry=r)
        self.switches = Counter("loraswitch_switch_events", "Routing events (select, abstain, switch) in answers.",
                                ["event"], registry=r)
        self.batch_size = Histogram("loraswitch_batch_size", "Rows per batched generate call.", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.queue_wait = Histogram("loraswitch_queue_wait_seconds", "Time from queueing to the start of its batch.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("loraswitch_time_to_first_token_seconds", "Time from queueing to the first token.",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.generation_time = Histogram("loraswitch_generation_seconds", "Time from queueing to the answer.",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("loraswitch_queue_depth", "Requests waiting for the worker.", registry=r)
        self.running = Gauge("loraswitch_running_requests", "Requests in the batch being decoded.", registry=r)
        self.adapters_loaded = Gauge("loraswitch_adapters_loaded", "Adapters loaded now.", registry=r)
        self.targets = Counter("loraswitch_escalation_targets", "Routed answers by who answered (adapter, base, "
                               "upstream) when an upstream is configured.", ["target"], registry=r)
        self.fallbacks = Counter("loraswitch_escalation_fallbacks", "Escalated requests the upstream failed, answered "
                                 "locally.", registry=r)
        self.upstream_latency = Histogram("loraswitch_upstream_latency_seconds", "Time the upstream took to answer an "
                                          "escalated request.", buckets=LATENCY_BUCKETS, registry=r)
        self.phase_seconds = Counter("loraswitch_phase_seconds", "Worker seconds by phase of the served path: segment, "
                                     "template, route (the auto selector's feature pass), prefill, decode, listener "
                                     "(detokenizing and events), and other (the rest of a round: taking jobs, "
                                     "bookkeeping).", ["phase"], registry=r)
        self.worker_busy = Counter("loraswitch_worker_busy_seconds", "Seconds the worker spent in rounds (the rest of "
                                   "the wall time it waited for requests).", registry=r)
        self.adapter_labels: set[str] = set()

    def adapter_label(self, name: str) -> str:
        """`name`, or "other" once MAX_ADAPTER_LABELS names were seen: adapters loaded at run time
        under ever new names must not grow the label sets (each is a series kept forever)."""
        if name not in self.adapter_labels:
            if len(self.adapter_labels) >= MAX_ADAPTER_LABELS:
                return "other"
            self.adapter_labels.add(name)
        return name

    def bind(self, scheduler) -> None:
        """Gauges read live from the scheduler and engine at scrape time."""
        self.queue_depth.set_function(lambda: scheduler.queue_depth)
        self.running.set_function(lambda: scheduler.answering)
        self.adapters_loaded.set_function(lambda: len(scheduler.engine.names))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ what the server reports
    def batch(self, size: int) -> None:
        """A batched forward (one `generate` call) of `size` rows ran."""
        self.batch_size.observe(size)

    def round(self, seconds: float, phases: dict[str, float]) -> None:
        """A worker round took `seconds`, `phases` of them as the library reported (`switch.run`'s
        batch `phases`); the rest is counted as "other"."""
        self.worker_busy.inc(max(0.0, seconds))
        for name, value in phases.items():
            self.phase_seconds.labels(phase=name).inc(max(0.0, value))
        self.phase_seconds.labels(phase="other").inc(max(0.0, seconds - sum(phases.values())))

    def queued(self, seconds: float) -> None:
        """A request waited `seconds` from queueing to the start of its batch."""
        self.queue_wait.observe(max(0.0, seconds))

    def answered(self, job, done) -> None:
        """A request was answered (`done`: the library's Done event)."""
        answer, request = done.answer, job.request
        self.generations.labels(outcome=answer.finish_reason).inc()
        if job.counts_prompt:  # the other samples of one prompt (n > 1) read it too, counted once as in usage
            self.prompt_tokens.inc(len(answer.prompt_ids))
        self.completion_tokens.inc(len(answer.token_ids))
        requested = request.model if request.model in ("auto", "base") else "explicit"
        who = "upstream" if (answer.routing or {}).get("target") == "upstream" else "base"
        for name in answered_adapters(request.model, answer.routing or {}) or [who]:
            self.routed.labels(adapter=self.adapter_label(name), requested=requested).inc()
        for name, n in tokens_by_adapter(answer.trace[: len(answer.token_ids)]).items():
            self.adapter_tokens.labels(adapter=self.adapter_label(name)).inc(n)
        for event in answer.events:
            self.switches.labels(event=str(event.get("event", "other"))).inc()
        self.escalation(answer.routing or {})
        if job.first_token is not None:
            self.first_token.observe(job.first_token - job.submitted)
        self.generation_time.observe(time.monotonic() - job.submitted)

    def escalation(self, routing: dict) -> None:
        """Who answered a routed request of a server with an upstream, and how long it took upstream."""
        target = routing.get("target")
        if target is None:
            return
        self.targets.labels(target=target).inc()
        if "fallback" in (routing.get("escalation") or {}):
            self.fallbacks.inc()
        latency = (routing.get("upstream") or {}).get("latency_s")
        if latency is not None:
            self.upstream_latency.observe(latency)

    def failed(self) -> None:
        self.generations.labels(outcome="error").inc()

    def cancelled(self) -> None:
        """A request was dropped before its answer: timeout, or the client went away."""
        self.generations.labels(outcome="cancelled").inc()
