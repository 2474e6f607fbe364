"""Fuzzing the request schema (issue 11): whatever body a client sends — wrong types, NaN and
Infinity, huge or negative integers, lone surrogates, unknown models and routers, numbered
parts, garbage bytes — the answer is never a 5xx, streamed or not.

Hypothesis draws bodies from the OpenAI schema with hostile values mixed in; derandomized (the
same examples every run) and bounded (a fixed number of examples, a tiny model, max_new_tokens
8), in-process through the ASGI app: no network at all.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from loraswitch.base import Base
from loraswitch.server import ServerSettings, create_app
from loraswitch.switch import Switch
from tests.conftest import tiny_model, write_adapter

EXAMPLES = 400  # about 15 s on 2 cores

ints = st.one_of(st.integers(-3, 12), st.integers(-(2**70), 2**70),
                 st.sampled_from([0, 2**63, 2**64 - 1, 2**64, 10**30]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, 1e-40, 1e-320, 5e-324, 1e-5, 0.5, 1.0, 2.0, 2.0000001, -0.0, 1e308]))
words = st.one_of(st.text(max_size=30),
                  st.sampled_from(["abc \ud800 def", "\udfff", "", "  ", "\x00", "🎉" * 4, "word " * 300,
                                   "1. add 2 and 3\n2. reverse these words\n3. say hi",
                                   "\n".join(f"{k}. q{k}" for k in range(1, 30))]))
anything = st.one_of(st.none(), st.booleans(), ints, floats, words, st.lists(ints, max_size=3))
models = st.one_of(st.sampled_from(["auto", "base", "alpha", "beta", "nope", "auto:arrow", "auto:seq", "auto:gate",
                                    "auto:nope", "alpha:x", ""]), anything)
content = st.one_of(words, anything, st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", 3])}, optional={"text": st.one_of(words, anything)}), max_size=2))
message = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system", "assistant", "developer",
                                                                     "tool"]), anything)},
                                optional={"content": content, "name": st.one_of(words, anything)})
common = {
    "max_tokens": st.one_of(ints, anything), "temperature": st.one_of(floats, anything),
    "top_p": st.one_of(floats, anything), "seed": st.one_of(ints, anything), "n": st.one_of(ints, anything),
    "stop": st.one_of(words, st.lists(words, max_size=5), anything), "stream": st.one_of(st.booleans(), anything),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), anything),
    "presence_penalty": st.one_of(floats, anything), "frequency_penalty": st.one_of(floats, anything),
    "repetition_penalty": st.one_of(floats, anything), "top_k": st.one_of(ints, anything),
    "min_p": st.one_of(floats, anything), "logit_bias": st.one_of(st.dictionaries(words, floats, max_size=2), anything),
    "loraswitch": st.one_of(st.fixed_dictionaries({}, optional={"trace": anything, "route": st.one_of(words, anything)}),
                            anything),
    "route": st.one_of(st.sampled_from(["auto", "seq", "arrow", "gate", "none"]), anything),
    "trace": anything, "user": anything,
}
prose = st.one_of(st.text(min_size=1, max_size=30), st.sampled_from([
    "What is 12 + 30?", "1. add 2 and 3\n2. reverse these words\n3. say hi", "Grüße 東京 🎉"]))
valid = {  # values the server must serve: each body is mostly these...
    "max_tokens": st.integers(1, 8), "temperature": st.one_of(st.floats(0, 2), st.sampled_from([0, 1e-40, 1e-320])),
    "top_p": st.floats(0.01, 1), "seed": st.integers(-(2**63), 2**64 - 1), "stream": st.booleans(),
    "stop": st.one_of(prose, st.lists(prose, min_size=1, max_size=4)), "route": st.sampled_from(["arrow", "auto"]),
    "loraswitch": st.fixed_dictionaries({}, optional={"trace": st.booleans()}), "n": st.integers(1, 2), "user": prose,
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2), "repetition_penalty": st.floats(0.5, 2),
    "top_k": st.integers(-1, 50), "min_p": st.floats(0, 1),
}
valid_chat = st.fixed_dictionaries(
    {"model": st.sampled_from(["auto", "base", "alpha", "beta", "auto:arrow"]),
     "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer"]),
                                                 "content": prose}), min_size=1, max_size=3)},
    optional={**valid, "logprobs": st.booleans(), "max_completion_tokens": st.integers(1, 8)})
valid_completion = st.fixed_dictionaries(
    {"model": st.sampled_from(["auto", "base", "alpha", "beta"]),
     "prompt": st.one_of(prose, st.lists(st.integers(0, 49151), min_size=1, max_size=6))},
    optional={**valid, "echo": st.booleans(), "logprobs": st.integers(0, 5)})
# ...with at most a few fields made hostile
chat_fields = sorted({*common, "model", "messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools",
                      "response_format"})
completion_fields = sorted({*common, "model", "prompt", "echo", "logprobs", "best_of", "suffix"})
hostile = {**{k: anything for k in chat_fields + completion_fields}, **common, "model": models,
           "messages": st.one_of(st.lists(message, min_size=1, max_size=3), anything),
           "prompt": st.one_of(words, st.lists(ints, max_size=6), st.lists(words, max_size=2),
                               st.lists(st.lists(ints, max_size=3), max_size=2), anything)}


def mutated(bodies, fields: list[str]):
    """A valid body with up to three fields replaced by hostile values."""
    changes = st.lists(st.sampled_from(fields).flatmap(lambda f: st.tuples(st.just(f), hostile[f])), max_size=3)
    return st.tuples(bodies, changes).map(lambda t: json.dumps({**t[0], **dict(t[1])}).encode())


requests = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), mutated(valid_chat, chat_fields)),
    st.tuples(st.just("/v1/completions"), mutated(valid_completion, completion_fields)),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/adapters"]),
              st.one_of(st.binary(max_size=64), anything.map(lambda v: json.dumps(v).encode()))),
)


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory, tokenizer):
    base = Base(model=tiny_model(seed=7), tokenizer=tokenizer, name="tiny-llama", source="random")
    root = tmp_path_factory.mktemp("fuzz_adapters")
    write_adapter(base.model, root / "alpha", r=4, targets=("q_proj", "v_proj"), seed=1)
    write_adapter(base.model, root / "beta", r=2, alpha=16, rslora=True, targets=("up_proj",), seed=2)
    switch = Switch(base, [root], router_dir=tmp_path_factory.mktemp("fuzz_no_routers"))
    app = create_app(switch, ServerSettings(max_batch=8, max_queue=64, max_prompt_tokens=96, max_new_tokens=8,
                                            default_max_tokens=4, timeout=20.0, max_body_bytes=64 * 1024,
                                            allow_adapter_admin=False))
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        yield client


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(req=requests)
def test_no_generated_body_gets_a_5xx(fuzz_client, req):
    path, body = req
    r = fuzz_client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (body[:300], r.status_code, r.text[:300])
    event(f"{r.status_code} {r.json()['error']['code'] if r.status_code >= 400 else ''}")  # --hypothesis-show-statistics
    if r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in r.text.splitlines():  # an error after the stream started must not be a crash either
            if line.startswith("data: {") and '"error"' in line:
                assert json.loads(line[6:])["error"]["type"] != "server_error", (body[:300], line)
