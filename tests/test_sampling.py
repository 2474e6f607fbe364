"""Sampling beyond temperature and top_p, as vLLM and the OpenAI API offer it: top_k, min_p,
and the presence, frequency and repetition penalties (which apply to greedy decoding too).
The repetition penalty must choose what transformers' own `generate` chooses."""

from __future__ import annotations

import pytest
import torch

from loraswitch.engine import Engine
from loraswitch.generate import Generation, SamplingParams, _penalized, _sample, generate
from loraswitch.switch.request import Request


@pytest.fixture
def engine(tiny_base):
    return Engine(tiny_base, [])


def test_repetition_penalty_chooses_what_transformers_chooses(engine, tiny_base):
    prompts = [tiny_base.chat_ids(p) for p in ("hello there", "say it again and again")]
    plain = generate(engine, prompts, params=SamplingParams(max_new_tokens=16, stop_ids=set()))
    for penalty in (1.5, 0.7):
        ours = generate(engine, prompts, params=SamplingParams(max_new_tokens=16, stop_ids=set(),
                                                               repetition_penalty=penalty))
        for p, res in zip(prompts, ours):
            ids = torch.tensor([p])
            with torch.no_grad():
                out = tiny_base.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                               min_new_tokens=16, do_sample=False, repetition_penalty=penalty,
                                               eos_token_id=None, pad_token_id=tiny_base.tokenizer.pad_token_id)
            assert res.token_ids == out[0, len(p):].tolist(), penalty
    assert [g.token_ids for g in ours] != [g.token_ids for g in plain]  # the penalty did change the answers


def test_presence_and_frequency_penalties_are_openais_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]])
    answer = Generation(prompt_ids=[4, 4, 1], token_ids=[3, 3, 2])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    # token 3 twice: -0.5 - 2 x 0.25; token 2 once: -0.5 - 0.25; prompt tokens are not counted
    assert _penalized(logits, [answer], params).tolist() == [[2.0, -1.0, -0.25, 2.0, 0.0]]
    both = SamplingParams(repetition_penalty=2.0)  # prompt and answer tokens: positive / 2, negative x 2
    assert _penalized(logits, [answer], both).tolist() == [[2.0, -2.0, 0.25, 1.5, 0.0]]
    assert _penalized(logits, [answer], SamplingParams(frequency_penalty=-1.0)).tolist() == [[2.0, -1.0, 1.5, 5.0, 0.0]]


def test_top_k_and_min_p_keep_only_the_likeliest_tokens():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([_sample(logits, SamplingParams(temperature=2.0, top_k=3), gen) for _ in range(300)], 1)
    for row, allowed in zip(draws.tolist(), logits.topk(3, -1).indices.tolist()):
        assert set(row) <= set(allowed) and len(set(row)) > 1
    greedy = logits.argmax(-1)
    assert torch.equal(_sample(logits, SamplingParams(temperature=1.0, top_k=1), gen), greedy)
    assert torch.equal(_sample(logits, SamplingParams(temperature=1.0, min_p=1.0), gen), greedy)
    probs = torch.softmax(logits / 2.0, -1)
    draws = torch.stack([_sample(logits, SamplingParams(temperature=2.0, min_p=0.3), gen) for _ in range(300)], 1)
    for b, row in enumerate(draws.tolist()):
        assert all(probs[b, t] >= 0.3 * probs[b].max() for t in row)


def test_requests_check_the_new_fields_and_batch_only_with_equal_ones():
    assert Request.chat("x", top_k=-1).top_k == 0  # vLLM's "off"
    for bad in (dict(top_k=-2), dict(top_k=2.5), dict(seed=2**64), dict(min_p=1.5), dict(presence_penalty=2.5),
                dict(frequency_penalty=float("nan")), dict(repetition_penalty=0), dict(repetition_penalty=11)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Request.chat("x", **bad)
    plain = Request.chat("x")
    assert plain.sampling_key == ("greedy",)
    assert Request.chat("x", repetition_penalty=1.2).sampling_key != plain.sampling_key
    assert Request.chat("x", top_k=5).sampling_key == plain.sampling_key  # greedy: top_k changes nothing
    sampled = Request.chat("x", temperature=0.7, top_k=5, min_p=0.1)
    assert sampled.sampling_key != Request.chat("x", temperature=0.7).sampling_key
    assert Request.chat("x", top_k=5.0, repetition_penalty=1).top_k == 5  # whole floats and ints are normalised


def test_seeds_beyond_32_bits_still_draw_differently():
    """torch's CPU generator keeps a seed's low 32 bits: 0, 2**32 and -2**63 drew the same tokens."""
    from loraswitch.generate import seed32

    assert seed32(7) == 7 and seed32(2**32 - 1) == 2**32 - 1  # what fits is used as it is
    high = [seed32(s) for s in (2**32, 2**63, -(2**63), -1, 2**64 - 1)]
    assert len(set(high + [0])) == 6 and all(0 <= s < 2**32 for s in high)
