"""Server-sent events: streamed answers equal the non-streamed ones and the library's (single and
multi-part), stop strings never leak into a stream, and the per-token pieces add up."""

from __future__ import annotations

from loraswitch.generate import SamplingParams
from tests.server.conftest import COMPOSITE, chat


def _pieces(chunks):
    return [t for c in chunks if c.choices and c.model_extra.get("routing", {}).get("tokens") for t in c.routing["tokens"]]


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
    pieces = _pieces(chunks)
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


def test_auto_answers_a_multi_part_prompt_part_by_part(client, lib):
    """Each numbered part is its own row (its own prompt and routing); the answer, trace and
    switch events are the library's (`Switch.chat`), streamed or not."""
    switch, _ = lib
    ref = switch.chat([COMPOSITE], model="auto", params=SamplingParams(max_new_tokens=30))[0]
    resp = chat(client, "auto", prompt=COMPOSITE, max_tokens=30, extra_body={"loraswitch": {"trace": True}})
    text = resp.choices[0].message.content
    assert text == ref.text and text.startswith("1. ") and "\n2. " in text and "\n3. " in text
    routing = resp.routing
    assert routing["fan_out"] == 3 and routing["adapter"] == ref.routing["adapter"]
    assert routing["events"] == ref.events
    assert len(routing["trace"]) == resp.usage.completion_tokens == len(ref.token_ids)
    assert [t["part"] for t in routing["trace"]] == [t["part"] for t in ref.trace]
    assert resp.model == ("+".join(routing["adapters"]) or "base")
    assert resp.batch["fan_out"] == 3

    chunks = list(chat(client, "auto", prompt=COMPOSITE, max_tokens=30, stream=True,
                       extra_body={"loraswitch": {"trace": True}}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    pieces = _pieces(chunks)
    assert "".join(p["text"] for p in pieces) == text
    assert [p["part"] for p in pieces] == sorted(p["part"] for p in pieces)  # parts stream in order
    assert [p["index"] for p in pieces] == sorted(p["index"] for p in pieces)
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][0]
    assert final.routing["events"] == routing["events"]
