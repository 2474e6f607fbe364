"""Logprobs as the OpenAI API has them, for every kind of `model`: the `openai` client's
`completions.create(logprobs=2, echo=True)` and `chat.completions.create(logprobs=True,
top_logprobs=2)` return well-formed logprobs equal to the library's."""

from __future__ import annotations

import math

import pytest

from loraswitch.switch.request import Request
from tests.server.conftest import COMPOSITE, PROMPT, chat, library_answer


@pytest.mark.parametrize("model", ["auto", "base", "beta"])
def test_completion_logprobs_with_echo(client, lib, model):
    switch, _ = lib
    resp = client.completions.create(model=model, prompt="Once upon a time", max_tokens=3, temperature=0,
                                     logprobs=2, echo=True)
    ref = library_answer(switch, Request(prompt="Once upon a time", model=model, max_tokens=3, logprobs=2, echo=True))
    choice = resp.choices[0]
    assert choice.text == "Once upon a time" + ref.text
    lp = choice.logprobs
    n = len(ref.prompt_ids) + len(ref.token_ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first token has no context
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    expected = [x.logprob for x in ref.prompt_logprobs[1:] + ref.logprobs]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-5)
    for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert 1 <= len(top) <= 3 and all(v <= 0 for v in top.values()) and max(top.values()) >= value - 1e-6
        assert top[token] == pytest.approx(value)  # the chosen token is among them, as OpenAI's and vLLM's
    generated = lp.token_logprobs[len(ref.prompt_ids):]
    assert all(math.isclose(v, max(t.values()), abs_tol=1e-6) for v, t in zip(generated, lp.top_logprobs[-3:]))


def test_completion_logprobs_0_gives_the_chosen_token_alone(client):
    lp = client.completions.create(model="base", prompt="x", max_tokens=2, temperature=0, logprobs=0).choices[0].logprobs
    assert [list(t) for t in lp.top_logprobs] == [[tok] for tok in lp.tokens]


def test_completion_without_logprobs_has_none(client):
    assert client.completions.create(model="alpha", prompt="x", max_tokens=2, temperature=0).choices[0].logprobs is None


@pytest.mark.parametrize("model", ["auto", "gamma"])
def test_chat_logprobs_streamed_and_not(client, lib, model):
    switch, _ = lib
    resp = chat(client, model, max_tokens=6, logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert "".join(c.token for c in content) == resp.choices[0].message.content
    for c in content:
        assert c.bytes == list(c.token.encode()) and len(c.top_logprobs) == 2
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob and c.logprob == pytest.approx(c.top_logprobs[0].logprob)
    ref = library_answer(switch, Request.chat(PROMPT, model=model, max_tokens=6, logprobs=2))
    assert [c.logprob for c in content] == pytest.approx([x.logprob for x in ref.logprobs], abs=1e-5)
    chunks = list(chat(client, model, max_tokens=6, logprobs=True, top_logprobs=2, stream=True))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-6)
    assert chat(client, model, max_tokens=2, logprobs=True).choices[0].logprobs.content[0].top_logprobs == []


def test_multi_part_chat_logprobs(client):
    resp = chat(client, "auto", prompt=COMPOSITE, max_tokens=30, logprobs=True, top_logprobs=1)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert "".join(c.token for c in content) == resp.choices[0].message.content
    assert content[0].token == "1" and content[0].logprob == 0.0  # separators: written by the assembly


def test_token_bytes_rebuild_characters_that_span_tokens(tokenizer):
    """An emoji is several byte-level tokens; each decodes alone to U+FFFD, so the `bytes` field
    must come from the token itself for a client to put the character back together."""
    from loraswitch.server.token_bytes import token_bytes

    text = "Party 🎉 café 日本 ü"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any(tokenizer.decode([i]) == "\ufffd" for i in ids)  # the case that needs it
    assert b"".join(bytes(token_bytes(tokenizer, i)) for i in ids).decode() == text
    assert bytes(token_bytes(tokenizer, tokenizer.eos_token_id)).decode() == tokenizer.eos_token


def test_token_bytes_of_sentencepiece_pieces_keep_their_space():
    """Llama-style vocabularies mark a word start with U+2581, which decoding one piece alone
    strips; byte-fallback pieces are single bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from loraswitch.server.token_bytes import token_bytes

    vocab = {"<unk>": 0, "\u2581hello": 1, "\u2581world": 2, "<0xF0>": 3}
    sp = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=sp)
    assert [bytes(token_bytes(tok, i)) for i in (1, 2, 3)] == [b" hello", b" world", b"\xf0"]
