"""The OpenAI API over HTTP: models, chat and completions equal the library's answers, routing
reports, and OpenAI-shaped errors for everything that cannot be served."""

from __future__ import annotations

import httpx
import openai
import pytest

from loraswitch.generate import SamplingParams
from loraswitch.switch.request import Request
from tests.server.conftest import PROMPT, chat, library_answer, wait_for


def test_models_list_auto_base_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[:2] == ["auto", "base"]
    assert {"alpha", "beta", "gamma"} <= set(ids)
    assert client.models.retrieve("alpha").id == "alpha"


def test_chat_explicit_adapter_matches_library(client, lib):
    switch, _ = lib
    resp = chat(client, "alpha", max_tokens=8)
    ref = switch.chat([PROMPT], model="alpha", params=SamplingParams(max_new_tokens=8))[0]
    assert resp.choices[0].message.content == ref.text
    assert resp.choices[0].finish_reason == ref.finish_reason
    assert resp.choices[0].logprobs is None
    assert resp.model == "alpha"
    assert resp.usage.prompt_tokens == len(ref.prompt_ids)
    assert resp.usage.completion_tokens == len(ref.token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    routing = resp.routing
    assert routing["adapter"] == "alpha" and routing["adapters"] == ["alpha"] and "trace" not in routing
    assert resp.batch["size"] >= 1 and resp.batch["queue_ms"] >= 0


def test_base_with_trace_and_multi_turn(client, lib):
    switch, _ = lib
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": PROMPT}]
    resp = client.chat.completions.create(model="base", messages=messages, max_tokens=6, temperature=0,
                                          extra_body={"loraswitch": {"trace": True}})
    assert resp.usage.prompt_tokens == len(switch.base.chat_ids(messages))  # the library's one template
    ref = library_answer(switch, Request(messages=tuple(messages), model="base", max_tokens=6))
    assert resp.choices[0].message.content == ref.text
    assert resp.model == "base"
    trace = resp.routing["trace"]
    assert len(trace) == resp.usage.completion_tokens
    assert all(t["adapters"] == {} for t in trace)
    assert "".join(t["token"] for t in trace) == resp.choices[0].message.content


def test_completions_endpoint(client, lib):
    switch, _ = lib
    resp = client.completions.create(model="beta", prompt="Once upon a time", max_tokens=5, temperature=0)
    ref = library_answer(switch, Request(prompt="Once upon a time", model="beta", max_tokens=5))
    assert resp.object == "text_completion"
    assert resp.choices[0].text == ref.text
    assert resp.usage.prompt_tokens == len(ref.prompt_ids) and resp.model == "beta"
    # token ids as the prompt give the same answer
    again = client.completions.create(model="beta", prompt=ref.prompt_ids, max_tokens=5, temperature=0)
    assert again.choices[0].text == ref.text


def test_penalties_and_vllm_sampling_fields_reach_the_library(client, lib):
    switch, _ = lib
    asked = dict(frequency_penalty=1.0, presence_penalty=0.5)
    resp = chat(client, "alpha", max_tokens=12, **asked, extra_body={"repetition_penalty": 1.3})
    ref = library_answer(switch, Request.chat(PROMPT, model="alpha", max_tokens=12, repetition_penalty=1.3, **asked))
    plain = library_answer(switch, Request.chat(PROMPT, model="alpha", max_tokens=12))
    assert resp.choices[0].message.content == ref.text != plain.text
    sampled = chat(client, "beta", max_tokens=8, temperature=1.5, seed=3, extra_body={"top_k": 4, "min_p": 0.05})
    ref = library_answer(switch, Request.chat(PROMPT, model="beta", max_tokens=8, temperature=1.5, seed=3, top_k=4,
                                              min_p=0.05))
    assert sampled.choices[0].message.content == ref.text
    for field, value in (("presence_penalty", 3), ("repetition_penalty", 0), ("top_k", -2), ("min_p", 1.5)):
        with pytest.raises(openai.BadRequestError) as err:
            chat(client, "alpha", extra_body={field: value})
        assert field in str(err.value), field


def test_auto_routes_and_reports(client, lib):
    switch, _ = lib
    resp = chat(client, "auto", max_tokens=6, extra_body={"loraswitch": {"trace": True}})
    routing = resp.routing
    assert routing["requested"] == "auto" and routing["router"] == "arrow"  # no trained selector here
    assert resp.model in ("base", *switch.engine.names) and resp.model == ("+".join(routing["adapters"]) or "base")
    assert len(routing["trace"]) == resp.usage.completion_tokens
    assert routing["events"] and routing["events"][0]["token_index"] == 0
    assert resp.batch["dynamic"] is True
    assert resp.choices[0].message.content == switch.chat([PROMPT], model="auto", params=SamplingParams(max_new_tokens=6))[0].text
    # a named router, and "auto:<router>" as the model
    assert chat(client, "auto", max_tokens=3, extra_body={"route": "arrow"}).routing["router"] == "arrow"
    assert chat(client, "auto:arrow", max_tokens=3).routing["router"] == "arrow"
    with pytest.raises(openai.BadRequestError) as err:  # no trained selector in this router folder
        chat(client, "auto", max_tokens=3, extra_body={"loraswitch": {"route": "seq"}})
    assert err.value.code == "router_unavailable"


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
    with pytest.raises(openai.BadRequestError):
        chat(client, "alpha", extra_body={"route": "arrow"})  # a router only applies to auto
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, "auto", extra_body={"route": "nonsense"})
    assert err.value.code == "invalid_route"
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, "alpha", top_logprobs=2)  # top_logprobs needs logprobs=true
    assert err.value.param == "top_logprobs"

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
    check(http.post("/v1/completions", json={"model": "alpha", "prompt": []}), 400)
    check(http.post("/v1/completions", json={"model": "alpha", "prompt": "a", "echo": True, "stream": True}), 400,
          "unsupported_parameter")
    check(http.get("/v1/nowhere"), 404, "unknown_endpoint")
    check(httpx.post(live.url + "/v1/chat/completions", json={"model": "alpha", "messages": []}), 401, "invalid_api_key")
    check(httpx.get(live.url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(live.url + "/healthz").status_code == 200  # operations need no key


def test_sse_lines_are_compact_json():
    import json

    from loraswitch.server.serving import sse

    line = sse({"a": "x\ny"})
    assert line.startswith("data: ") and line.endswith("\n\n") and "\n" not in line[:-2]
    assert json.loads(line[6:]) == {"a": "x\ny"}


def test_a_resident_limit_is_served_and_reported(client, http, lib):
    switch, _ = lib
    switch.engine.limit_resident(1)
    try:
        for name in ("alpha", "beta", "gamma"):
            assert chat(client, model=name).model == name  # each paged in on first use
        # the answer can reach the client just before its round ends and the limit is applied
        wait_for(lambda: http.get("/healthz").json()["resident"]["adapters"] == ["gamma"])
        health = http.get("/healthz").json()["resident"]
        assert health["limit"] == 1 and health["page_ins"] >= 2
        cards = {a["id"]: a["resident"] for a in http.get("/v1/adapters").json()["data"]}
        assert cards == {"alpha": False, "beta": False, "gamma": True}
    finally:
        switch.engine.limit_resident(None)
    assert "resident" not in http.get("/healthz").json()


def test_the_compiled_step_serves_every_context_after_its_warm_up(client, http, lib):
    """`serve --compile`: after the warm-up the step's shapes are reported on /healthz; a request
    whose context needs a longer bucket than the warm-up's decodes compiled with no compile
    mid-serving (on a CPU the cache length is symbolic from the first graph), and the answers are
    the eager loop's."""
    from torch._dynamo.utils import counters

    from loraswitch.generate import warm_up

    switch, _ = lib
    short, long = {"max_tokens": 8}, {"max_tokens": 40, "prompt": PROMPT + " Say more."}
    want = [chat(client, **short).choices[0].message.content, chat(client, **long).choices[0].message.content]
    assert "compiled_step" not in http.get("/healthz").json()
    switch.engine.compile = "eager"
    try:
        warm_up(switch.engine)
        graphs = counters["stats"]["unique_graphs"]
        got = [chat(client, **short).choices[0].message.content, chat(client, **long).choices[0].message.content]
        health = http.get("/healthz").json()["compiled_step"]
    finally:
        switch.engine.compile, switch.engine.decoder = False, None
    assert got == want
    assert health["frozen"] and health["failed"] is None and "1x64x1" in health["graphs"]
    # ~40 prompt positions + 40 answer tokens need the 128 bucket: compiled, nothing traced anew
    assert health["uncompiled"] == [] and "1x128x1" in health["graphs"]
    assert counters["stats"]["unique_graphs"] == graphs
