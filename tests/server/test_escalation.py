"""Escalation to an upstream model, end to end with two real servers on loopback: an edge
loraswitch escalating to a central loraswitch (tiny random models; no mocks). The edge's
threshold is set by hand (0: everything routed goes up; NEVER: nothing does) so each test
knows what must happen; the calibration maths is tested on its own."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from loraswitch.base import Base
from loraswitch.generate import SamplingParams
from loraswitch.server import ServerSettings, create_app
from loraswitch.switch import Switch
from loraswitch.switch.escalate import Escalator
from loraswitch.switch.escalation import NEVER, risks, threshold_for_rate
from loraswitch.switch.request import Request
from loraswitch.switch.upstream import Upstream
from tests.conftest import tiny_model, write_adapter
from tests.server.conftest import LiveServer, wait_for

CENTRAL_MODEL = "beta"  # what the edge asks the central server for
PROMPT = "Tell me something about rivers."


def settings(**kw) -> ServerSettings:
    return ServerSettings(max_batch=8, max_new_tokens=40, default_max_tokens=10, default_temperature=0.0, timeout=30.0,
                          **kw)


def tiny_switch(tokenizer, root, seed: int) -> Switch:
    base = Base(model=tiny_model(seed=seed), tokenizer=tokenizer, name=f"tiny-{seed}", source="random")
    for i, name in enumerate(("alpha", "beta")):
        if not (root / name).exists():
            write_adapter(base.model, root / name, r=4, targets=("q_proj", "v_proj"), seed=10 + i)
    return Switch(base, [root], router_dir=root / "no_routers")


@pytest.fixture(scope="module")
def central(tmp_path_factory, tokenizer):
    server = LiveServer(create_app(tiny_switch(tokenizer, tmp_path_factory.mktemp("central"), 5), settings()))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def edge_switch(tmp_path_factory, tokenizer):
    return tiny_switch(tokenizer, tmp_path_factory.mktemp("edge"), 7)


@pytest.fixture(scope="module")
def edge(edge_switch):
    server = LiveServer(create_app(edge_switch, settings()))
    yield server
    server.stop()


@pytest.fixture
def escalate_to(edge_switch):
    """Point the edge at an upstream with a threshold for one test."""
    def use(url: str, threshold: float, timeout: float = 10.0) -> Escalator:
        edge_switch.upstream = Escalator(Upstream(url, CENTRAL_MODEL, timeout=timeout), threshold)
        return edge_switch.upstream
    yield use
    edge_switch.upstream = None


def ask(url: str, model: str = "auto", **kw) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 10, "temperature": 0, **kw}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=30)


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def closed_port() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}"


def test_escalated_answer_is_the_upstreams(central, edge, escalate_to):
    escalate_to(central.url, threshold=0.0)
    direct = ask(central.url, CENTRAL_MODEL).json()
    before = metric(edge.url, 'loraswitch_escalation_targets_total{target="upstream"}')
    r = ask(edge.url)
    assert r.status_code == 200
    out = r.json()
    assert out["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    assert out["model"] == f"upstream:{CENTRAL_MODEL}"
    routing = out["routing"]
    assert routing["target"] == "upstream" and routing["escalation"]["threshold"] == 0.0
    assert "threshold 0.00" in routing["reason"]
    assert routing["upstream"]["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"]
    usage = out["usage"]  # the edge read the prompt to decide; the upstream read and wrote
    assert usage["upstream"] == {k: direct["usage"][k] for k in ("prompt_tokens", "completion_tokens")}
    assert usage["local"]["prompt_tokens"] > 0 and usage["local"]["completion_tokens"] == 0
    assert usage["total_tokens"] == usage["local"]["prompt_tokens"] + direct["usage"]["total_tokens"]
    assert metric(edge.url, 'loraswitch_escalation_targets_total{target="upstream"}') == before + 1
    assert metric(edge.url, "loraswitch_upstream_latency_seconds_count") >= 1
    assert httpx.get(edge.url + "/healthz").json()["upstream"]["model"] == CENTRAL_MODEL
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}  # completions go to /v1/completions
    done = httpx.post(edge.url + "/v1/completions", json={**body, "model": "auto"}, timeout=30).json()
    want = httpx.post(central.url + "/v1/completions", json={**body, "model": CENTRAL_MODEL}, timeout=30).json()
    assert done["routing"]["target"] == "upstream" and done["choices"][0]["text"] == want["choices"][0]["text"]


def test_below_threshold_and_explicit_models_stay_local(central, edge, escalate_to):
    escalate_to(central.url, threshold=NEVER)
    routing = ask(edge.url).json()["routing"]
    assert routing["target"] in ("adapter", "base") and routing["escalation"]["target"] == routing["target"]
    assert 0.0 <= routing["escalation"]["risk"] <= 1.0
    escalate_to(central.url, threshold=0.0)
    explicit = ask(edge.url, "alpha").json()  # naming a model asks for this server's
    assert explicit["model"] == "alpha" and "target" not in explicit["routing"]
    with_logprobs = ask(edge.url, logprobs=True, top_logprobs=1).json()  # logprobs are of local tokens
    assert with_logprobs["routing"]["target"] in ("adapter", "base")
    assert "kept local" in with_logprobs["routing"]["escalation"]["reason"]
    base_only = ask(edge.url, loraswitch={"allow": []}).json()  # allow / deny name this server's adapters
    assert base_only["model"] == "base" and base_only["routing"]["target"] == "base"
    assert "allow / deny" in base_only["routing"]["escalation"]["reason"]


def test_upstream_down_falls_back_to_the_local_answer(edge, edge_switch, escalate_to):
    local = ask(edge.url).json()["choices"][0]["message"]["content"]  # no upstream yet
    escalate_to(closed_port(), threshold=0.0)
    before = metric(edge.url, "loraswitch_escalation_fallbacks_total")
    r = ask(edge.url)
    assert r.status_code == 200
    out = r.json()
    assert out["choices"][0]["message"]["content"] == local
    esc = out["routing"]["escalation"]
    assert out["routing"]["target"] in ("adapter", "base") and esc["decided"] == "upstream"
    assert "upstream failed, answered locally" in esc["fallback"] and "ConnectError" in esc["fallback"]
    assert metric(edge.url, "loraswitch_escalation_fallbacks_total") == before + 1


def test_upstream_timeout_falls_back(central, edge, escalate_to):
    escalate_to(central.url, threshold=0.0, timeout=0.5)
    central.scheduler.pause()  # the central server accepts the request and never answers it
    try:
        r = ask(edge.url)
    finally:
        central.scheduler.resume()
    assert r.status_code == 200
    assert "ReadTimeout" in r.json()["routing"]["escalation"]["fallback"]


def test_worker_does_not_wait_for_the_upstream(central, edge, escalate_to):
    escalate_to(central.url, threshold=0.0, timeout=20)
    central.scheduler.pause()  # the escalated request waits upstream...
    try:
        with ThreadPoolExecutor(1) as pool:
            escalated = pool.submit(ask, edge.url)
            wait_for(lambda: central.scheduler.queue_depth == 1)
            began = time.monotonic()
            local = ask(edge.url, "alpha")  # ...while the edge keeps answering its own requests
            assert local.status_code == 200 and time.monotonic() - began < 10
            assert not escalated.done()
            central.scheduler.resume()
            assert escalated.result(timeout=30).json()["routing"]["target"] == "upstream"
    finally:
        central.scheduler.resume()


def test_streaming_passes_through(central, edge, escalate_to):
    escalate_to(central.url, threshold=0.0)
    direct = ask(central.url, CENTRAL_MODEL).json()["choices"][0]["message"]["content"]
    client = openai.OpenAI(base_url=edge.url + "/v1", api_key="none", max_retries=0, timeout=30)
    chunks = list(client.chat.completions.create(model="auto", messages=[{"role": "user", "content": PROMPT}],
                                                 max_tokens=10, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # token by token, not one blob
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert final.model_extra["routing"]["target"] == "upstream"
    assert chunks[-1].usage.model_extra["upstream"]["completion_tokens"] > 0


def test_library_switch_escalates_and_falls_back(central, edge_switch):
    edge_switch.upstream = Escalator(Upstream(central.url, CENTRAL_MODEL), 0.0)
    try:
        too_long = edge_switch.chat([PROMPT], model="auto", params=SamplingParams(max_new_tokens=64))[0]
        assert "HTTP 400" in too_long.routing["escalation"]["fallback"]  # the central server's limit is 40
        params = SamplingParams(max_new_tokens=10)
        up = edge_switch.chat([PROMPT, PROMPT], model="auto", params=params)[0]
        named = edge_switch.chat([PROMPT], model="alpha", params=params)[0]
        assert up.routing["target"] == "upstream" and up.text and "target" not in named.routing
        events = [e for _, e in edge_switch.stream([Request.chat(PROMPT, max_tokens=10)])]
        assert type(events[-1]).__name__ == "Done" and events[-1].answer.routing["target"] == "upstream"
        edge_switch.upstream = Escalator(Upstream(closed_port(), CENTRAL_MODEL), 0.0)
        down = edge_switch.chat([PROMPT], model="auto", params=params)[0]
        assert down.routing["target"] in ("adapter", "base") and "fallback" in down.routing["escalation"]
    finally:
        edge_switch.upstream = None


def test_calibrated_threshold_escalates_the_target_rate(edge_switch):
    scores = [i / 100 for i in range(100)]
    assert threshold_for_rate(scores, 0.0) == NEVER
    for rate in (0.1, 0.2, 0.5):
        t = threshold_for_rate(scores, rate)
        assert abs(sum(s >= t for s in scores) / len(scores) - rate) <= 0.011
    prompts = [f"Question {i}: what is {i} plus {i * 3}?" for i in range(20)] + [f"Write a poem about {w}."
                                                                               for w in "abcdefghij"]
    esc = Escalator(Upstream("http://127.0.0.1:9", "m"))
    t = esc.calibrate(edge_switch, prompts, 0.3)
    share = sum(r >= t for r in risks(edge_switch, prompts)) / len(prompts)
    assert abs(share - 0.3) <= 1 / len(prompts) and esc.calibrated_on == len(prompts)
