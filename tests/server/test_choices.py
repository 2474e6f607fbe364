"""Several choices from one body: `n` samples, a list of completion prompts, and the two
together (choice i answers prompt i // n), streamed or not; `echo` with `max_tokens: 0`
(the prompt's logprobs alone). Each choice must say what the library says for its request."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from loraswitch.switch.request import Request
from tests.server.conftest import PROMPT, library_answer, wait_for


def _sampled(switch, seed, max_tokens=6):
    return library_answer(switch, Request.chat(PROMPT, model="gamma", max_tokens=max_tokens, temperature=0.9,
                                               seed=seed)).text


def test_chat_n_samples_each_seeded_and_usage_counts_the_prompt_once(client, lib):
    switch, _ = lib
    resp = client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": PROMPT}], n=3,
                                          max_tokens=6, temperature=0.9, seed=11)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    texts = [c.message.content for c in resp.choices]
    assert texts == [_sampled(switch, 11 + j) for j in range(3)]  # sample j is seed + j, reproducible alone
    assert len(set(texts)) > 1  # samples, not one answer three times
    ref = library_answer(switch, Request.chat(PROMPT, model="gamma", max_tokens=6))
    completion = sum(len(library_answer(switch, Request.chat(PROMPT, model="gamma", max_tokens=6, temperature=0.9,
                                                             seed=11 + j)).token_ids) for j in range(3))
    assert resp.usage.prompt_tokens == len(ref.prompt_ids)  # one prompt, read once
    assert resp.usage.completion_tokens == completion
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + completion
    assert resp.model == "gamma"
    extra = resp.model_extra
    assert "routing" not in extra and all(c.model_extra["routing"]["adapter"] == "gamma" for c in resp.choices)


def test_completion_batch_of_prompts_answers_each_in_order(client, lib):
    switch, _ = lib
    prompts = ["Once upon a time", "The river ran", "Counting: one, two,"]
    models = ["beta", "alpha"]
    for model in models:
        resp = client.completions.create(model=model, prompt=prompts, max_tokens=5, temperature=0)
        refs = [library_answer(switch, Request(prompt=p, model=model, max_tokens=5)) for p in prompts]
        assert [c.index for c in resp.choices] == [0, 1, 2]
        assert [c.text for c in resp.choices] == [r.text for r in refs]
        assert resp.usage.prompt_tokens == sum(len(r.prompt_ids) for r in refs)
        assert resp.usage.completion_tokens == sum(len(r.token_ids) for r in refs)
    ids = [r.prompt_ids for r in refs]  # a batch of token-id prompts is the same batch
    again = client.completions.create(model="alpha", prompt=ids, max_tokens=5, temperature=0)
    assert [c.text for c in again.choices] == [r.text for r in refs]


def test_completion_batch_times_n_orders_choices_by_prompt(http, lib):
    switch, _ = lib
    prompts = ["Once upon a time", "The river ran"]
    body = {"model": "beta", "prompt": prompts, "n": 2, "max_tokens": 4, "temperature": 0.8, "seed": 5}
    choices = http.post("/v1/completions", json=body).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for c in choices:
        p, j = divmod(c["index"], 2)
        ref = library_answer(switch, Request(prompt=prompts[p], model="beta", max_tokens=4, temperature=0.8, seed=5 + j))
        assert c["text"] == ref.text, c


def test_streamed_choices_carry_their_index_and_add_up(client, lib):
    switch, _ = lib
    stream = client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": PROMPT}], n=2,
                                            max_tokens=6, temperature=0.9, seed=3, stream=True,
                                            stream_options={"include_usage": True})
    text, finished, roles, usage = {0: "", 1: ""}, {}, {}, None
    for chunk in stream:
        if not chunk.choices:
            usage = chunk.usage
            continue
        (c,) = chunk.choices
        if c.delta.role:
            roles[c.index] = c.delta.role
        text[c.index] += c.delta.content or ""
        if c.finish_reason:
            assert c.index not in finished
            finished[c.index] = c.finish_reason
    assert roles == {0: "assistant", 1: "assistant"} and set(finished) == {0, 1}
    assert [text[0], text[1]] == [_sampled(switch, 3), _sampled(switch, 4)]
    assert usage is not None and usage.completion_tokens > 0


def test_echo_with_max_tokens_zero_scores_the_prompt_alone(http, lib):
    switch, _ = lib
    prompt = "The river ran down to the sea"
    body = {"model": "alpha", "prompt": prompt, "echo": True, "logprobs": 1, "temperature": 0}
    zero = http.post("/v1/completions", json={**body, "max_tokens": 0}).json()
    one = http.post("/v1/completions", json={**body, "max_tokens": 1}).json()
    (c0,), (c1,) = zero["choices"], one["choices"]
    n = len(library_answer(switch, Request(prompt=prompt, model="alpha", max_tokens=1)).prompt_ids)
    assert c0["text"] == prompt and c0["finish_reason"] == "length"
    assert len(c0["logprobs"]["tokens"]) == n and c0["logprobs"]["token_logprobs"][0] is None
    assert c0["logprobs"]["token_logprobs"] == c1["logprobs"]["token_logprobs"][:n]  # the same prefill
    assert zero["usage"] == {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}
    r = http.post("/v1/completions", json={**body, "max_tokens": 0, "echo": False})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_too_many_choices_and_a_mixed_batch_are_refused(http, client):
    with pytest.raises(openai.BadRequestError) as err:  # the live server queues 6
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPT}], n=7, max_tokens=2)
    assert err.value.code == "too_many_choices" and err.value.param == "n"
    r = http.post("/v1/completions", json={"model": "alpha", "prompt": ["a", "b", "c", "d"], "n": 2, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_choices"
    r = http.post("/v1/completions", json={"model": "alpha", "prompt": [[1, 2], [3, 10**9]], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt.1", r.text
    r = http.post("/v1/completions", content=json.dumps({"model": "alpha", "prompt": ["a", [1, 2]]}),
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    r = http.post("/v1/completions", json={"model": "alpha", "prompt": "a", "n": 2, "best_of": 1, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of" and "at least n" in r.text


def test_the_choices_are_queued_together_or_not_at_all(client, live):
    """A body whose choices do not all fit the queue is a 429 that queues none of them."""
    sched = live.scheduler
    sched.pause()
    try:
        with ThreadPoolExecutor(4) as pool:
            waiting = [pool.submit(client.chat.completions.create, model="alpha", max_tokens=2, temperature=0,
                                   messages=[{"role": "user", "content": PROMPT}]) for _ in range(4)]
            wait_for(lambda: sched.queue_depth == 4)
            with pytest.raises(openai.RateLimitError):  # 3 more choices; the queue has room for 2
                client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPT}], n=3,
                                               max_tokens=2)
            assert sched.queue_depth == 4
            sched.resume()
            assert all(f.result().choices[0].message.content is not None for f in waiting)
    finally:
        sched.resume()


def test_streamed_stop_reason_metrics_and_malformed_prompts(http, client, lib):
    switch, _ = lib
    full = library_answer(switch, Request(prompt="The river ran", model="beta", max_tokens=8)).text
    stop = full[3:6]
    body = {"model": "beta", "prompt": "The river ran", "max_tokens": 8, "temperature": 0, "stop": [stop]}
    plain = http.post("/v1/completions", json=body).json()["choices"][0]
    lines = http.post("/v1/completions", json={**body, "stream": True}).text.splitlines()
    last = [json.loads(line[6:]) for line in lines if line.startswith("data: {")][-1]["choices"][0]
    assert plain["stop_reason"] == last["stop_reason"] == stop and last["finish_reason"] == "stop"

    def prompt_tokens():
        text = http.get("/metrics").text
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("loraswitch_prompt_tokens_total")))

    before = prompt_tokens()
    resp = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPT}], n=3,
                                          max_tokens=2, temperature=0)
    assert prompt_tokens() - before == resp.usage.prompt_tokens  # the prompt counted once, as in usage
    for bad in (["Hi", [19556]], [19556, "Hi"], ["Hi", 5], [[1, 2], []], [True, 2]):
        r = http.post("/v1/completions", json={"model": "alpha", "prompt": bad, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_prompt", (bad, r.text)
    r = http.post("/v1/completions", content=b'{"model": "alpha", "prompt": "\xff\xfe"}',
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    r = http.post("/v1/completions", json={"model": "alpha", "prompt": ["a"] * 7, "max_tokens": 2})
    assert r.json()["error"]["param"] == "prompt"  # too many prompts, not too many samples
