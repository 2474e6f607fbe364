"""The bounded queue and its worker: 429 when full, 504 on timeout, dynamic batching of waiting
requests into one forward, per-request limits and cancellation, adapter hot-load/unload with
requests in flight, and what /healthz and /metrics report about it."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from loraswitch.server.scheduler import Job, Scheduler
from loraswitch.switch.request import Done, Handle, Request, Started, Token
from tests.server.conftest import PROMPT, chat, library_answer, wait_for


def _start_together(sched, jobs) -> None:
    """Start `sched` with `jobs` queued before its worker takes any: one round for all of them."""
    sched.pause()
    sched.start()
    for job in jobs:
        sched.submit(job)
    sched.resume()


def _job(model, max_tokens, sink, prompt=PROMPT):
    job = Job(Handle(Request.chat(prompt, model=model, max_tokens=max_tokens)))
    job.deliver = sink  # the test reads the events in the worker thread
    return job


def test_queue_full_is_429_and_waiting_requests_finish(client, live):
    sched = live.scheduler
    sched.pause()
    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(chat, client, "alpha", max_tokens=3) for _ in range(6)]
            wait_for(lambda: sched.queue_depth == 6)
            with pytest.raises(openai.RateLimitError) as err:
                chat(client, "beta", max_tokens=3)
            assert err.value.status_code == 429 and err.value.code == "queue_full"
            assert err.value.response.headers["Retry-After"] == "1"
            sched.resume()
            assert all(f.result().choices[0].message.content is not None for f in futures)
    finally:
        sched.resume()


def test_healthz_and_metrics(client, live):
    """Runs after the 429 above (same server): every kind of outcome is counted."""
    chat(client, "beta", max_tokens=3)
    httpx.get(live.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    health = httpx.get(live.url + "/healthz").json()
    assert health["status"] == "ok" and health["queue_depth"] == 0 and "alpha" in health["adapters"]
    assert health["scheduler"]["recent"] and health["scheduler"]["batches"] >= 1
    text = httpx.get(live.url + "/metrics").text
    for needle in ('loraswitch_requests_total{endpoint="chat",status="200"}',
                   'loraswitch_requests_total{endpoint="chat",status="429"}',
                   'loraswitch_requests_total{endpoint="models",status="401"}',
                   "loraswitch_prompt_tokens_total ", "loraswitch_completion_tokens_total ",
                   "loraswitch_queue_depth 0.0", "loraswitch_batch_size_bucket{le=\"8.0\"}",
                   'loraswitch_routed_requests_total{adapter="beta",requested="explicit"}',
                   'loraswitch_adapter_tokens_total{adapter="beta"}',
                   'loraswitch_generations_total{outcome="length"}',
                   'loraswitch_request_latency_seconds_bucket{endpoint="chat",le="0.5"}',
                   "loraswitch_queue_wait_seconds_bucket", "loraswitch_time_to_first_token_seconds_bucket",
                   "loraswitch_adapters_loaded 3.0", 'loraswitch_phase_seconds_total{phase="prefill"}',
                   'loraswitch_phase_seconds_total{phase="decode"}', "loraswitch_worker_busy_seconds_total "):
        assert needle in text, needle
    assert "_created" not in text


def test_timeout_is_504_and_unqueues(client, live):
    sched = live.scheduler
    settings = live.app.state.settings
    sched.pause()
    settings.timeout = 0.3
    try:
        with pytest.raises(openai.APIStatusError) as err:
            chat(client, "alpha", max_tokens=3)
        assert err.value.status_code == 504 and err.value.code == "request_timeout"
        assert sched.queue_depth == 0
    finally:
        settings.timeout = 30.0
        sched.resume()
    assert chat(client, "alpha", max_tokens=2).choices[0].finish_reason in ("stop", "length")
    assert 'loraswitch_generations_total{outcome="cancelled"}' in httpx.get(live.url + "/metrics").text


def test_concurrent_requests_share_one_batched_forward(client, live):
    models = ["alpha", "beta", "gamma", "base", "alpha"]
    solo = [chat(client, m, max_tokens=6 + i).choices[0].message.content for i, m in enumerate(models)]
    sched = live.scheduler
    wait_for(lambda: sched.running == 0)  # the worker counts a batch after its answers are sent
    before = sched.stats["batches"]
    sched.pause()
    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(chat, client, m, max_tokens=6 + i) for i, m in enumerate(models)]
            futures.append(pool.submit(chat, client, "auto", max_tokens=4))
            wait_for(lambda: sched.queue_depth == 6)
            sched.resume()
            results = [f.result() for f in futures]
    finally:
        sched.resume()
    static, routed = results[:5], results[5]
    assert len({r.batch["id"] for r in static}) == 1, [r.batch for r in static]
    assert all(r.batch["size"] == 5 and r.batch["dynamic"] is False for r in static)
    # per-layer routing (arrow) cannot share a forward: its own batch, right after
    assert routed.batch["dynamic"] is True and routed.batch["id"] != static[0].batch["id"]
    wait_for(lambda: sched.running == 0)  # the answers were sent before the worker counted their batches
    assert sched.stats["batches"] == before + 2, (before, [(b["id"], b["size"], b["models"]) for b in sched.recent][4:])
    for i, (m, r) in enumerate(zip(models, static)):
        assert r.model == m
        assert r.choices[0].message.content == solo[i]  # batched (left-padded) greedy == alone
        assert r.usage.completion_tokens <= 6 + i  # each row kept its own max_tokens
    health = httpx.get(live.url + "/healthz").json()
    assert health["scheduler"]["max_batch_size"] >= 5


def test_answering_counts_the_requests_still_being_answered_not_the_rounds_jobs(lib):
    """/healthz's `running` is `answering`: a round keeps its jobs until it ends, so a request
    answered early must not count while the others decode."""
    import threading

    switch, _ = lib
    sched = Scheduler(switch, max_batch=8, max_queue=8)
    release, tokens = threading.Event(), {"a": 0, "b": 0}

    def sink_for(key):
        def sink(event):
            if isinstance(event, Token):
                tokens[key] += 1
                if key == "b" and tokens["b"] == 6:
                    release.wait(30)  # holds the worker, mid-round, after "a" was answered
        return sink

    jobs = {key: _job("alpha", n, sink_for(key)) for key, n in (("a", 3), ("b", 20))}
    try:
        _start_together(sched, jobs.values())
        wait_for(lambda: jobs["a"].finished and tokens["b"] >= 6)
        assert sched.running == 2 and sched.answering == 1
        release.set()
        wait_for(lambda: jobs["b"].finished and sched.running == 0)
        assert sched.answering == 0
    finally:
        release.set()
        sched.stop()


def test_scheduler_per_row_limits_and_cancel(lib):
    switch, _ = lib
    sched = Scheduler(switch, max_batch=8, max_queue=8)
    events: dict[str, list] = {"a": [], "b": [], "c": []}
    jobs = {}

    def sink_for(key):
        def sink(event):
            events[key].append(event)
            if key == "c" and len([e for e in events["c"] if isinstance(e, Token)]) == 2:
                jobs["c"].handle.cancel()
        return sink

    for key, n in (("a", 3), ("b", 20), ("c", 20)):
        jobs[key] = _job("alpha", n, sink_for(key))
    try:
        _start_together(sched, jobs.values())
        wait_for(lambda: all(j.finished for j in jobs.values() if j is not jobs["c"]) and sched.running == 0)
    finally:
        sched.stop()
    done = {k: [e.answer for e in ev if isinstance(e, Done)] for k, ev in events.items()}
    assert len(done["a"][0].token_ids) == 3 and done["a"][0].finish_reason == "length"
    assert len(done["b"][0].token_ids) <= 20
    assert done["c"] == [] and not jobs["c"].finished
    assert len([e for e in events["c"] if isinstance(e, Token)]) <= 3
    assert sched.stats["batches"] == 1 and sched.stats["max_batch_size"] == 3
    # the streamed deltas add up to the final text
    assert "".join(e.text for e in events["b"] if isinstance(e, Token)) == done["b"][0].text


def test_a_round_waits_for_requests_still_being_prepared(lib):
    """A burst reaches the queue one by one: the worker does not start a round while a request
    is announced (`arriving`), so both share one batch; a lone request never waits."""
    switch, _ = lib
    sched = Scheduler(switch, max_batch=8, max_queue=8, gather_max_s=30.0)
    events: dict[str, list] = {"a": [], "b": []}
    jobs = {k: _job("alpha", 2, events[k].append) for k in events}
    sched.start()
    try:
        with sched.arriving():  # b is still being tokenized while a is queued
            with sched.arriving():
                sched.submit(jobs["a"])
            threading.Event().wait(0.2)
            assert jobs["a"].started is None  # held for b
            sched.submit(jobs["b"])
        wait_for(lambda: all(j.finished for j in jobs.values()))
        lone = _job("alpha", 2, lambda e: None)
        sched.submit(lone)  # nothing announced: taken at once
        wait_for(lambda: lone.finished)
    finally:
        sched.stop()
    done = {k: [e for e in ev if isinstance(e, Done)][0] for k, ev in events.items()}
    assert done["a"].batch["id"] == done["b"].batch["id"] and done["a"].batch["size"] == 2


def test_hot_load_unload_and_bad_adapters(client, http, lib, live):
    switch, spare = lib
    r = http.post("/v1/adapters", json={"path": str(spare / "delta")})
    assert r.status_code == 201, r.text
    assert r.json()["id"] == "delta" and r.json()["ranks"] == [4]
    assert "delta" in [m.id for m in client.models.list().data]
    assert http.post("/v1/adapters", json={"path": str(spare / "delta")}).status_code == 409
    bad = http.post("/v1/adapters", json={"path": str(spare / "broken")})
    assert bad.status_code == 400 and "corrupt adapter_config.json" in bad.json()["error"]["message"]
    assert bad.json()["error"]["code"] == "invalid_adapter"
    missing = http.post("/v1/adapters", json={"path": str(spare / "nope"), "name": "nope"})
    assert missing.status_code == 400 and "not a readable adapter folder" in missing.json()["error"]["message"]
    assert http.post("/v1/adapters", json={"path": str(spare / "delta"), "name": "auto"}).status_code == 400
    assert http.delete("/v1/adapters/nope").status_code == 404
    assert chat(client, "alpha", max_tokens=2).model == "alpha"  # still serving

    # in flight: the worker is held inside the generation while the adapter is removed over HTTP
    ref = chat(client, "delta", max_tokens=10).choices[0].message.content
    started, proceed, finished = threading.Event(), threading.Event(), threading.Event()
    got = []

    def sink(event):
        if isinstance(event, Token) and not started.is_set():
            started.set()
            proceed.wait(10)
        if isinstance(event, Done):
            got.append(event.answer)
            finished.set()

    live.scheduler.submit(_job("delta", 10, sink))
    assert started.wait(10)
    try:
        gone = http.delete("/v1/adapters/delta")  # prompt: the batch decoding with it is held
        assert gone.status_code == 202 and gone.json()["status"] == "removing", gone.text
        assert "delta" not in [m.id for m in client.models.list().data]  # new requests: 404 at once
        assert http.delete("/v1/adapters/delta").status_code == 404
    finally:
        proceed.set()
    assert finished.wait(10)
    assert got[0].text == ref and got[0].routing["adapter"] == "delta"  # explicit: answered by delta all along
    wait_for(lambda: "delta" not in [a["id"] for a in http.get("/v1/adapters").json()["data"]])
    with pytest.raises(openai.NotFoundError):
        chat(client, "delta", max_tokens=2)
    # and back again, under a new name
    assert http.post("/v1/adapters", json={"path": str(spare / "delta"), "name": "delta2"}).status_code == 201
    assert chat(client, "delta2", max_tokens=10).choices[0].message.content == ref
    assert http.delete("/v1/adapters/delta2").status_code == 200
    assert len(http.get("/v1/adapters").json()["data"]) == 3


@pytest.mark.parametrize("continuous", [True, False])
def test_requests_arriving_mid_batch_join_it_when_they_fit(lib, continuous):
    """Continuous batching: a request that arrives while a batch decodes joins it between steps
    (same batch id, the answer it gets alone); one that does not fit it (sampled, where the batch
    is greedy) waits for a batch of its own, and so does everything behind it. Off: every arrival
    waits for the next round."""
    switch, _ = lib
    sched = Scheduler(switch, max_batch=8, max_queue=8, continuous=continuous)
    events: dict[str, list] = {k: [] for k in "abcd"}
    later = {"b": _job("beta", 5, events["b"].append, "second prompt"),
             "c": Job(Handle(Request.chat("a sampled one", model="gamma", max_tokens=4, temperature=0.8))),
             "d": _job("alpha", 3, events["d"].append, "behind the sampled one")}
    later["c"].deliver = events["c"].append

    def first(event):
        events["a"].append(event)
        if isinstance(event, Token) and len([e for e in events["a"] if isinstance(e, Token)]) == 2:
            sched.submit(later["b"])  # arrives while "a" decodes (and room is left)
        if isinstance(event, Token) and len([e for e in events["a"] if isinstance(e, Token)]) == 4:
            sched.submit(later["c"])
            sched.submit(later["d"])

    a = _job("alpha", 24, first, "the first prompt")
    sched.start()
    try:
        sched.submit(a)
        wait_for(lambda: a.finished and all(j.finished for j in later.values()) and sched.running == 0, 60)
    finally:
        sched.stop()
    done = {k: [e for e in ev if isinstance(e, Done)][0] for k, ev in events.items()}
    joined_a = done["b"].batch["id"] == done["a"].batch["id"]
    assert joined_a is continuous
    assert done["c"].batch["id"] != done["a"].batch["id"] and done["d"].batch["id"] != done["a"].batch["id"]
    assert done["b"].answer.text == library_answer(switch, Request.chat("second prompt", model="beta", max_tokens=5)).text
    assert sched.stats["joined"] == (1 if continuous else 0)


def test_a_library_change_due_stops_the_joining(lib):
    """A change queued for between rounds (adapter load/unload) must not wait behind a batch that
    keeps taking rows: nothing joins once it is due, the batch drains, the change runs, and the
    request that arrived meanwhile is answered in the next round."""
    switch, _ = lib
    sched = Scheduler(switch, max_batch=8, max_queue=8)
    order: list[str] = []
    events: dict[str, list] = {"a": [], "b": []}

    def second(event):
        events["b"].append(event)
        if isinstance(event, Started):
            order.append("b started")

    b = _job("beta", 3, second, "second prompt")

    def first(event):
        events["a"].append(event)
        if isinstance(event, Token) and len([e for e in events["a"] if isinstance(e, Token)]) == 2:
            sched.call_between_rounds(lambda: order.append("change"))
            sched.submit(b)

    a = _job("alpha", 12, first, "the first prompt")
    sched.start()
    try:
        sched.submit(a)
        wait_for(lambda: a.finished and b.finished and sched.running == 0, 60)
    finally:
        sched.stop()
    done = {k: [e for e in ev if isinstance(e, Done)][0] for k, ev in events.items()}
    assert done["b"].batch["id"] != done["a"].batch["id"] and sched.stats["joined"] == 0
    assert order == ["change", "b started"]


def test_arrivals_join_the_compiled_step_and_answer_as_alone(lib, monkeypatch):
    """`serve --compile` with continuous batching: requests arriving while a batch decodes on the
    static step join it (into the slots of rows that left, or a rebuilt state) and answer what
    the eager loop answers for them alone; a request cancelled mid-answer leaves the others as
    they were."""
    switch, _ = lib
    specs = {"a": ("alpha", 24, "the first prompt"), "b": ("beta", 3, "second"), "c": ("gamma", 5, "a third one"),
             "d": ("alpha", 12, "a fourth prompt, longer than the batch's first prompt and its answer so far"),
             "e": ("beta", 6, "fifth"), "x": ("gamma", 24, "cancelled")}
    want = {k: library_answer(switch, Request.chat(p, model=m, max_tokens=n)).text for k, (m, n, p) in specs.items()}
    events: dict[str, list] = {k: [] for k in specs}
    jobs = {k: _job(m, n, events[k].append, p) for k, (m, n, p) in specs.items()}
    due = {1: ["b", "x"], 3: ["c"], 6: ["d"], 13: ["e"]}  # after this many tokens of "a"
    sched = Scheduler(switch, max_batch=8, max_queue=8, continuous=True)

    def first(event):
        events["a"].append(event)
        n = len([e for e in events["a"] if isinstance(e, Token)])
        if isinstance(event, Token):
            for k in due.pop(n, []):
                sched.submit(jobs[k])
            if n == 5:
                jobs["x"].handle.cancel()

    jobs["a"].deliver = first
    from loraswitch.static import StaticStepper

    calls = []
    for method in ("_place", "_rebuild"):
        original = getattr(StaticStepper, method)
        monkeypatch.setattr(StaticStepper, method, lambda self, *a, _o=original, _m=method: calls.append(_m) or _o(self, *a))
    switch.engine.compile, switch.engine.decoder = "none", None
    sched.start()
    try:
        sched.submit(jobs["a"])
        wait_for(lambda: all(j.finished for k, j in jobs.items() if k != "x") and sched.running == 0, 60)
    finally:
        sched.stop()
        switch.engine.compile, switch.engine.decoder = False, None
    done = {k: [e for e in ev if isinstance(e, Done)] for k, ev in events.items()}
    assert {k: d[0].answer.text for k, d in done.items() if k != "x"} == {k: v for k, v in want.items() if k != "x"}
    assert sched.stats["joined"] >= 4  # b, c, d, e joined the first batch (or a batch they started)
    assert done["x"] == [] and len([e for e in events["x"] if isinstance(e, Token)]) < 24  # it left when cancelled
    # b and x, c (no slot free yet) and d (a prompt longer than the batch's context) rebuild the
    # state; e, long after b, c and x left, takes a freed slot in place
    assert calls.count("_rebuild") >= 3 and calls[-1] == "_place", calls
