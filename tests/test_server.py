"""The OpenAI-compatible server, end to end: the real `openai` client against uvicorn on 127.0.0.1
(random free port) serving a tiny random Llama with three random adapters."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlencode

import httpx
import openai
import pytest
import uvicorn

from loraswitch.base import Base
from loraswitch.generate import FixedPolicy, SamplingParams, explicit, generate
from loraswitch.routing.arrow import ArrowRouter
from loraswitch.server import ServerSettings, create_app
from loraswitch.server.policy import RowsPolicy
from loraswitch.server.scheduler import Job, Scheduler, _holdback
from loraswitch.switch import Switch
from tests.conftest import tiny_model, write_adapter

KEY = "sk-test-key"
PROMPT = "Tell me something about rivers."
CHROMIUM = Path("/usr/bin/chromium")


class LiveServer:
    """uvicorn in a thread on a socket we bound ourselves (no port race)."""

    def __init__(self, app):
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    @property
    def scheduler(self) -> Scheduler:
        return self.app.state.scheduler

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def lib(tmp_path_factory, tokenizer):
    base = Base(model=tiny_model(), tokenizer=tokenizer, name="tiny-llama", source="random")
    root = tmp_path_factory.mktemp("server_adapters")
    write_adapter(base.model, root / "alpha", r=4, targets=("q_proj", "v_proj"), seed=1)
    write_adapter(base.model, root / "beta", r=8, alpha=4, targets=("q_proj", "k_proj", "o_proj", "down_proj"), seed=2)
    write_adapter(base.model, root / "gamma", r=2, alpha=16, rslora=True, targets=("gate_proj", "up_proj", "v_proj"), seed=3)
    spare = tmp_path_factory.mktemp("spare_adapters")
    write_adapter(base.model, spare / "delta", r=4, targets=("q_proj", "v_proj", "o_proj"), seed=4)
    (spare / "broken").mkdir()
    (spare / "broken" / "adapter_config.json").write_text("{not json")
    routers = tmp_path_factory.mktemp("no_routers")  # no trained routers: auto falls back to arrow
    switch = Switch(base, [root], router_dir=routers)
    return switch, spare


@pytest.fixture(scope="module")
def live(lib):
    switch, _ = lib
    settings = ServerSettings(max_batch=8, max_queue=6, max_prompt_tokens=120, max_new_tokens=40, default_max_tokens=12,
                              default_temperature=0.0, timeout=30.0, api_key=KEY)
    server = LiveServer(create_app(switch, settings))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c


def chat(client, model="alpha", prompt=PROMPT, **kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **kw)


def reference(switch, name, prompt=PROMPT, n=8):
    """What the library itself answers (greedy), to compare the server with."""
    ids = switch.base.chat_ids(prompt)
    return generate(switch.engine, [ids], explicit(switch.engine, [name]), SamplingParams(max_new_tokens=n, temperature=0))[0]


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# ---------------------------------------------------------------------------- the API
def test_models_list_auto_base_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[:2] == ["auto", "base"]
    assert {"alpha", "beta", "gamma"} <= set(ids)
    assert client.models.retrieve("alpha").id == "alpha"


def test_chat_explicit_adapter_matches_library(client, lib):
    switch, _ = lib
    resp = chat(client, "alpha", max_tokens=8)
    ref = reference(switch, "alpha", n=8)
    assert resp.choices[0].message.content == ref.text
    assert resp.choices[0].finish_reason == ref.finish_reason
    assert resp.model == "alpha"
    assert resp.usage.prompt_tokens == len(ref.prompt_ids)
    assert resp.usage.completion_tokens == len(ref.token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    routing = resp.routing
    assert routing["adapter"] == "alpha" and routing["adapters"] == ["alpha"] and "trace" not in routing
    assert resp.batch["size"] >= 1


def test_base_with_trace_and_multi_turn(client, lib):
    switch, _ = lib
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": PROMPT}]
    resp = client.chat.completions.create(model="base", messages=messages, max_tokens=6, temperature=0,
                                          extra_body={"loraswitch": {"trace": True}})
    ids = switch.base.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.model == "base"
    trace = resp.routing["trace"]
    assert len(trace) == resp.usage.completion_tokens
    assert all(t["adapters"] == {} for t in trace)
    assert "".join(t["token"] for t in trace) == resp.choices[0].message.content


def test_completions_endpoint(client, lib):
    switch, _ = lib
    resp = client.completions.create(model="beta", prompt="Once upon a time", max_tokens=5, temperature=0)
    ids = switch.base.tokenizer("Once upon a time")["input_ids"]
    ref = generate(switch.engine, [ids], explicit(switch.engine, ["beta"]), SamplingParams(max_new_tokens=5, temperature=0))[0]
    assert resp.object == "text_completion"
    assert resp.choices[0].text == ref.text
    assert resp.usage.prompt_tokens == len(ids) and resp.model == "beta"
    # token ids as the prompt give the same answer
    again = client.completions.create(model="beta", prompt=ids, max_tokens=5, temperature=0)
    assert again.choices[0].text == ref.text


def test_streaming_chat_equals_non_streaming(client):
    full = chat(client, "gamma", max_tokens=10)
    chunks = list(chat(client, "gamma", max_tokens=10, stream=True, stream_options={"include_usage": True},
                       extra_body={"loraswitch": {"trace": True}}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model == "gamma"
    assert finals[0].routing["adapter"] == "gamma" and "events" in finals[0].routing
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens and chunks[-1].choices == []
    pieces = [t for c in chunks if c.choices and c.model_extra.get("routing", {}).get("tokens")
              for t in c.routing["tokens"]]
    assert "".join(p["text"] for p in pieces) == text
    assert all(p["adapters"] == {"gamma": 1.0} for p in pieces)


def test_stop_strings_stream_and_not(client):
    full = client.completions.create(model="alpha", prompt="The river", max_tokens=16, temperature=0).choices[0].text
    assert len(full) > 6
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.find(stop)]
    resp = client.completions.create(model="alpha", prompt="The river", max_tokens=16, temperature=0, stop=[stop, "zzzq"])
    assert resp.choices[0].text == expected and resp.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="alpha", prompt="The river", max_tokens=16, temperature=0,
                                              stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_holdback():
    assert _holdback("abc", ["cde"]) == 1
    assert _holdback("abcd", ["cdx", "bcdy"]) == 3
    assert _holdback("abc", ["xyz"]) == 0


def test_auto_routes_and_reports(client, lib):
    switch, _ = lib
    resp = chat(client, "auto", max_tokens=6, extra_body={"loraswitch": {"trace": True}})
    routing = resp.routing
    assert routing["requested"] == "auto" and routing["router"] == "arrow"  # no trained selector here
    assert resp.model in ("base", *switch.engine.names) and resp.model == ("+".join(routing["adapters"]) or "base")
    assert len(routing["trace"]) == resp.usage.completion_tokens
    assert routing["events"] and routing["events"][0]["token_index"] == 0
    assert resp.batch["dynamic"] is True
    # a named router, and "auto:<router>" as the model
    assert chat(client, "auto", max_tokens=3, extra_body={"route": "arrow"}).routing["router"] == "arrow"
    assert chat(client, "auto:arrow", max_tokens=3).routing["router"] == "arrow"
    with pytest.raises(openai.BadRequestError) as err:  # no trained selector in this router folder
        chat(client, "auto", max_tokens=3, extra_body={"loraswitch": {"route": "seq"}})
    assert err.value.code == "router_unavailable"


COMPOSITE = "Answer each part on its own line.\n1. Tell me about rivers.\n2. Name a colour.\n3. Count to three."


def test_auto_answers_a_multi_part_prompt_part_by_part(client, lib):
    """Each numbered part is its own row (its own prompt and routing); the answer, trace and
    switch events are assembled exactly as the library assembles them, streamed or not."""
    switch, _ = lib
    ref = switch.chat([COMPOSITE], model="auto", params=SamplingParams(max_new_tokens=12))[0]
    resp = chat(client, "auto", prompt=COMPOSITE, max_tokens=12, extra_body={"loraswitch": {"trace": True}})
    text = resp.choices[0].message.content
    assert text == ref.text and text.startswith("1. ") and "\n2. " in text and "\n3. " in text
    routing = resp.routing
    assert routing["fan_out"] == 3 and routing["adapter"] == ref.routing["adapter"]
    assert [(e["part"], e["token_index"]) for e in routing["events"]] == [(e["part"], e["token_index"]) for e in ref.events]
    assert len(routing["trace"]) == resp.usage.completion_tokens == len(ref.token_ids)
    assert [t["part"] for t in routing["trace"]] == [t["part"] for t in ref.trace]
    assert resp.model == ("+".join(routing["adapters"]) or "base")

    chunks = list(chat(client, "auto", prompt=COMPOSITE, max_tokens=12, stream=True,
                       extra_body={"loraswitch": {"trace": True}}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    pieces = [t for c in chunks if c.choices and c.model_extra.get("routing", {}).get("tokens")
              for t in c.routing["tokens"]]
    assert "".join(p["text"] for p in pieces) == text
    assert [p["part"] for p in pieces] == sorted(p["part"] for p in pieces)  # parts stream in order
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][0]
    assert final.routing["events"] == routing["events"]


# ---------------------------------------------------------------------------- errors
def test_errors_are_openai_shaped(client, http, live):
    with pytest.raises(openai.NotFoundError) as err:
        chat(client, "no-such-adapter")
    assert err.value.code == "model_not_found" and err.value.param == "model"
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, "alpha", prompt="word " * 200)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, "alpha", max_tokens=41)
    assert err.value.code == "max_tokens_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, "alpha", n=2)
    assert err.value.param == "n"
    with pytest.raises(openai.BadRequestError):
        chat(client, "alpha", extra_body={"route": "arrow"})  # a router only applies to auto
    with pytest.raises(openai.BadRequestError):
        chat(client, "auto", extra_body={"route": "nonsense"})

    def check(resp, status, code=None):
        assert resp.status_code == status, resp.text
        body = resp.json()
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
        if code:
            assert body["error"]["code"] == code

    check(http.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}), 400,
          "invalid_json")
    check(http.post("/v1/chat/completions", content=b"[1, 2]", headers={"Content-Type": "application/json"}), 400)
    check(http.post("/v1/chat/completions", json={"model": "alpha"}), 400)  # no messages
    check(http.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "tool", "content": "x"}]}), 400)
    check(http.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": "x"}],
                                                  "temperature": 5}), 400)
    check(http.post("/v1/completions", json={"model": "alpha", "prompt": ["a", "b"]}), 400)
    check(http.get("/v1/nowhere"), 404)
    check(httpx.post(live.url + "/v1/chat/completions", json={"model": "alpha", "messages": []}), 401, "invalid_api_key")
    check(httpx.get(live.url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(live.url + "/healthz").status_code == 200  # operations need no key


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
            sched.resume()
            assert all(f.result().choices[0].message.content is not None for f in futures)
    finally:
        sched.resume()


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


# ---------------------------------------------------------------------------- batching
def test_concurrent_requests_share_one_batched_forward(client, live):
    models = ["alpha", "beta", "gamma", "base", "alpha"]
    solo = [chat(client, m, max_tokens=6 + i).choices[0].message.content for i, m in enumerate(models)]
    sched = live.scheduler
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
    assert sched.stats["batches"] == before + 2
    for i, (m, r) in enumerate(zip(models, static)):
        assert r.model == m
        assert r.choices[0].message.content == solo[i]  # batched (left-padded) greedy == alone
        assert r.usage.completion_tokens <= 6 + i  # each row kept its own max_tokens
    health = httpx.get(live.url + "/healthz").json()
    assert health["scheduler"]["max_batch_size"] >= 5


def test_rows_policy_matches_separate_generations(lib):
    switch, _ = lib
    engine = switch.engine
    prompts = [switch.base.chat_ids(p) for p in ("one", "two two", "three three three")]
    params = SamplingParams(max_new_tokens=5, temperature=0)
    alone = [generate(engine, [p], explicit(engine, [n]), params)[0].token_ids
             for p, n in zip(prompts, ["alpha", "alpha", "beta"])]
    mixed = RowsPolicy([(explicit(engine, ["alpha", "alpha"]), 0), (explicit(engine, ["beta"]), 2)], 3)
    together = generate(engine, prompts, mixed, params)
    assert [g.token_ids for g in together] == alone
    assert together[2].trace[0]["adapters"] == {"beta": 1.0}
    arrow = ArrowRouter(engine).policy(engine, ["x"])
    with pytest.raises(ValueError, match="dynamic"):
        RowsPolicy([(arrow, 0), (FixedPolicy([([-1], [1.0])]), 1)], 2)
    assert RowsPolicy([(arrow, 0)], 1).dynamic is not None


def test_scheduler_per_row_limits_and_cancel(lib):
    switch, _ = lib
    sched = Scheduler(switch, max_batch=8, max_queue=8)
    events: dict[str, list] = {"a": [], "b": [], "c": []}
    jobs = {}

    def sink_for(key):
        def sink(kind, payload):
            events[key].append((kind, payload))
            if key == "c" and kind == "delta" and len([e for e in events["c"] if e[0] == "delta"]) == 2:
                jobs["c"].cancelled = True
        return sink

    ids = switch.base.chat_ids(PROMPT)
    for key, n in (("a", 3), ("b", 20), ("c", 20)):
        jobs[key] = Job(prompt_ids=ids, route_text=PROMPT, model="alpha", max_tokens=n, temperature=0,
                        stream=True, sink=sink_for(key))
    sched.pause()
    sched.start()
    try:
        for job in jobs.values():
            sched.submit(job)
        sched.resume()
        wait_for(lambda: all(j.finished for j in jobs.values()) and sched.running == 0)
    finally:
        sched.stop()
    done = {k: [p for kind, p in ev if kind == "done"] for k, ev in events.items()}
    assert done["a"][0].completion_tokens == 3 and done["a"][0].finish_reason == "length"
    assert done["b"][0].completion_tokens <= 20
    assert done["c"] == [] and jobs["c"].state == "cancelled" and len(jobs["c"].token_ids) <= 3
    assert sched.stats["batches"] == 1 and sched.stats["max_batch_size"] == 3
    # the streamed deltas add up to the final text
    assert "".join(p["text"] for kind, p in events["b"] if kind == "delta") == done["b"][0].text


# ---------------------------------------------------------------------------- adapters
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
    assert missing.status_code == 400 and "not a directory" in missing.json()["error"]["message"]
    assert http.post("/v1/adapters", json={"path": str(spare / "delta"), "name": "auto"}).status_code == 400
    assert http.delete("/v1/adapters/nope").status_code == 404
    assert chat(client, "alpha", max_tokens=2).model == "alpha"  # still serving

    # in flight: the worker is held inside the generation while the adapter is removed over HTTP
    ref = chat(client, "delta", max_tokens=10).choices[0].message.content
    started, proceed, finished = threading.Event(), threading.Event(), threading.Event()
    got = []

    def sink(kind, payload):
        if kind == "delta" and not started.is_set():
            started.set()
            proceed.wait(10)
        if kind == "done":
            got.append(payload)
            finished.set()

    job = Job(prompt_ids=switch.base.chat_ids(PROMPT), route_text=PROMPT, model="delta", max_tokens=10, temperature=0,
              stream=True, sink=sink)
    live.scheduler.submit(job)
    assert started.wait(10)
    try:
        assert http.delete("/v1/adapters/delta").status_code == 200
        assert "delta" not in [m.id for m in client.models.list().data]
    finally:
        proceed.set()
    assert finished.wait(10)
    assert got[0].text == ref and got[0].model == "delta"
    with pytest.raises(openai.NotFoundError):
        chat(client, "delta", max_tokens=2)
    # and back again, under a new name
    assert http.post("/v1/adapters", json={"path": str(spare / "delta"), "name": "delta2"}).status_code == 201
    assert chat(client, "delta2", max_tokens=10).choices[0].message.content == ref
    assert http.delete("/v1/adapters/delta2").status_code == 200
    assert len(http.get("/v1/adapters").json()["data"]) == 3


# ---------------------------------------------------------------------------- operations
def test_healthz_and_metrics(client, live):
    chat(client, "beta", max_tokens=3)
    health = httpx.get(live.url + "/healthz").json()
    assert health["status"] == "ok" and health["queue_depth"] == 0 and "alpha" in health["adapters"]
    text = httpx.get(live.url + "/metrics").text
    for needle in ('loraswitch_requests_total{endpoint="chat",status="200"}',
                   'loraswitch_requests_total{endpoint="chat",status="429"}',
                   'loraswitch_requests_total{endpoint="chat",status="401"}',
                   "loraswitch_prompt_tokens_total ", "loraswitch_completion_tokens_total ",
                   "loraswitch_queue_depth 0.0", "loraswitch_batch_size_bucket{le=\"8.0\"}",
                   'loraswitch_routed_requests_total{adapter="beta",requested="explicit"}',
                   'loraswitch_adapter_tokens_total{adapter="beta"}',
                   'loraswitch_request_latency_seconds_bucket{endpoint="chat",le="0.5"}',
                   "loraswitch_time_to_first_token_seconds_bucket", "loraswitch_adapters_loaded 3.0"):
        assert needle in text, needle
    assert "_created" not in text


def test_serve_command_line():
    import typer
    from typer.testing import CliRunner

    from loraswitch.server.cli import serve

    app = typer.Typer()
    app.command("serve")(serve)
    app.command("noop")(lambda: None)  # a group, so "serve" is a subcommand as in the main CLI
    assert CliRunner().invoke(app, ["serve", "--help"]).exit_code == 0
    command = typer.main.get_command(app).commands["serve"]
    flags = {opt for param in command.params for opt in param.opts}
    for flag in ("--base", "--adapter-dir", "--host", "--port", "--api-key", "--max-batch", "--max-queue",
                 "--max-prompt-tokens", "--max-new-tokens", "--timeout"):
        assert flag in flags, flag


# ---------------------------------------------------------------------------- the /ui page
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,900"]
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (scripts/install-browser.sh)")


@needs_chromium
def test_ui_page_loads_models(live):
    """Plain headless Chromium (--dump-dom): the page loads and lists the models from /v1/models."""
    assert httpx.get(live.url + "/ui/static/app.js").status_code == 200
    profile = tempfile.mkdtemp(prefix="chromium-")
    try:
        out = subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                              "--dump-dom", f"{live.url}/ui?{urlencode({'key': KEY})}"],
                             capture_output=True, text=True, timeout=90)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("auto", "base", "alpha", "beta", "gamma"):
        assert f'<option value="{name}"' in out.stdout, name
    assert '<li data-adapter="gamma">' in out.stdout  # the legend knows every adapter up front


@needs_chromium
@pytest.mark.skipif(not CHROMEDRIVER.exists(), reason="needs /usr/bin/chromedriver (scripts/install-browser.sh)")
def test_ui_streams_and_colours_tokens(live):
    """A person's session: type a prompt, pick a model, run, watch the coloured stream finish."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="chromium-")
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
    try:
        driver.get(f"{live.url}/ui")
        driver.find_element(By.ID, "api-key").send_keys(KEY + Keys.TAB)  # the models load with the key
        wait = WebDriverWait(driver, 20)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) >= 5)

        def run(model: str, prompt: str, max_tokens: int) -> str:
            box = driver.find_element(By.ID, "prompt")
            box.clear()
            box.send_keys(prompt)
            Select(driver.find_element(By.ID, "model")).select_by_value(model)
            field = driver.find_element(By.ID, "max-tokens")
            field.clear()
            field.send_keys(str(max_tokens))
            driver.find_element(By.ID, "run").click()
            wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error"))
            return driver.find_element(By.ID, "status").text

        status = run("alpha", PROMPT, 8)
        assert "answered by alpha" in status, status
        tokens = driver.find_elements(By.CSS_SELECTOR, "#answer .tok")
        assert 1 <= len(tokens) <= 8 and {t.get_attribute("data-adapter") for t in tokens} == {"alpha"}
        assert tokens[0].value_of_css_property("background-color") != tokens[0].value_of_css_property("color")
        legend = driver.find_element(By.CSS_SELECTOR, '#legend li[data-adapter="alpha"]').text
        assert f"{len(tokens)} token" in legend

        status = run("auto", PROMPT, 6)
        assert status.startswith("done"), status
        assert driver.find_elements(By.CSS_SELECTOR, "#events li")  # routing events listed...
        assert driver.find_elements(By.CSS_SELECTOR, "#answer .tok.event")  # ...and marked on their tokens
        assert "arrow" in driver.find_element(By.ID, "routing").text

        status = run("beta", "word " * 200, 4)  # the server's 400 is shown, not swallowed
        assert driver.find_element(By.ID, "status").get_attribute("data-state") == "error"
        assert "tokens" in status
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_json_helpers_roundtrip():
    # the SSE payloads are compact JSON the browser parses line by line
    from loraswitch.server.app import _sse

    line = _sse({"a": "x\ny"})
    assert line.startswith("data: ") and line.endswith("\n\n") and "\n" not in line[:-2]
    assert json.loads(line[6:]) == {"a": "x\ny"}
