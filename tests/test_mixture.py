"""Adapters composed on request (`switch.mixture`): the model-string grammar, and exactness: a
mixture's answer equals the base with the weighted LoRA deltas merged into its weights
(merged here by PEFT, independently of the kernels), and weight 1 of one adapter is that adapter."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import PeftModel

from loraswitch.generate import SamplingParams
from loraswitch.library import AdapterError
from loraswitch.switch import Switch
from loraswitch.switch.mixture import Mixture, MixtureError, allowed_set, mixture_of, parse_model
from tests.conftest import tiny_model

PROMPTS = ["Tell me something about rivers.", "Count to three, slowly."]


@pytest.fixture
def switch(tiny_base, adapter_dir, tmp_path):
    return Switch(tiny_base, [adapter_dir], router_dir=tmp_path / "no_routers")


def test_model_strings():
    assert parse_model("alpha:0.7+beta:0.3") == Mixture((("alpha", 0.7), ("beta", 0.3)))
    assert parse_model(" alpha : 0.5 ").spec == "alpha:0.5"
    assert parse_model("alpha+beta:2").spec == "alpha:1+beta:2"  # a term without a weight has weight 1
    assert parse_model("alpha:+1").spec == "alpha:1" and parse_model("alpha:-0").spec == "alpha:0"
    assert parse_model("a:0.5+1b:0.5").names == ["a", "1b"]
    for plain in ("auto", "auto:arrow", "base", "alpha", "my:adapter"):
        assert parse_model(plain) is None, plain
    bad = {"alpha:-0.1+beta:1": "negative", "alpha:nan+beta:1": "finite", "alpha:inf": "finite",
           "alpha:1e999": "finite", "alpha:x+beta:1": "not a number", "alpha:1+alpha:2": "twice",
           "auto:1+beta:1": "cannot be part", "base:0.5": "cannot be part", ":1+beta:1": "non-empty",
           # a malformed weight is the mixture's error, never an "unknown adapter 'alpha:'"
           "alpha:": "not a number", "alpha:0x10": "not a number", "alpha:0.5:0.2": "more than one ':'",
           "alpha:1_0": "not a number", "alpha:\uff11": "not a number", "alpha:\u0661": "not a number"}
    for text, why in bad.items():
        with pytest.raises(MixtureError, match=why):
            parse_model(text)
    assert mixture_of({"a": 1, "b": 0.25}).spec == "a:1+b:0.25"
    for weights in ({"a": 0.12345678, "b": 0.3}, {"a": 99.5}, {"a": 1e-7, "b": 1}):  # written as given
        m = mixture_of(weights)
        assert parse_model(m.spec) == m and "e" not in m.spec.replace("a:", "").replace("b:", ""), m.spec
    for text in ("alpha:1000000", "alpha:100.5+beta:1"):  # past MAX_WEIGHT: refused, never an overflow
        with pytest.raises(MixtureError, match="above 100"):
            parse_model(text)
    with pytest.raises(MixtureError, match="above 100"):
        mixture_of({"a": 1234567})
    with pytest.raises(MixtureError):
        mixture_of({})
    assert allowed_set(["a", "b", "c"], None, ()) is None
    assert allowed_set(["a", "b", "c"], None, ["b"]) == {"a", "c"}
    assert allowed_set(["a", "b", "c"], ["a", "b"], ["b"]) == {"a"}


def test_switch_refuses_what_it_cannot_serve(switch):
    with pytest.raises(AdapterError, match="nope"):
        switch.chat(["hi"], model="alpha:0.5+nope:0.5")
    with pytest.raises(MixtureError, match="negative"):
        switch.chat(["hi"], model={"alpha": -1.0})
    with pytest.raises(MixtureError, match="only apply to model 'auto'"):
        switch.chat(["hi"], model="alpha", deny=["beta"])
    with pytest.raises(AdapterError, match="nope"):
        switch.chat(["hi"], model="auto", allow=["nope"])


def test_stream_takes_the_models_chat_takes_and_refuses_the_same_alone(switch):
    """Requests built by hand for `stream` / `run`: a {name: weight} model and list-valued allow /
    deny are read as `chat` reads them (they crashed the batch's thread, every request lost), and
    a request `chat` would refuse fails alone, its neighbours answered."""
    from loraswitch.switch import Request
    from loraswitch.switch.request import Done, Failed

    reqs = [Request.chat("hi", model={"alpha": 1.0}, max_tokens=3), Request.chat("hi", allow=["alpha"], max_tokens=3),
            Request.chat("hi", deny=["beta"], max_tokens=3), Request.chat("hi", allow=("nope",), max_tokens=3),
            Request.chat("hi", model="alpha", allow=("alpha",), max_tokens=3), Request.chat("hi", model="alpha", max_tokens=3)]
    assert reqs[0].model == "alpha:1" and reqs[1].allow == ("alpha",) and reqs[2].deny == ("beta",)
    ends = {i: e for i, e in switch.stream(reqs) if isinstance(e, (Done, Failed))}
    assert sorted(ends) == list(range(6))
    assert [isinstance(ends[i], Done) for i in range(6)] == [True, True, True, False, False, True]
    assert isinstance(ends[3].error, AdapterError) and "nope" in str(ends[3].error)
    assert isinstance(ends[4].error, MixtureError) and "only apply to model 'auto'" in str(ends[4].error)
    assert ends[0].answer.token_ids == ends[5].answer.token_ids  # weight 1 of alpha is alpha


def _merged(adapter_dir, weights: dict[str, float]) -> torch.nn.Module:
    """A copy of the base with sum_e w_e * delta_e merged into its weights, each delta taken from
    PEFT's own merge of that adapter (merged weight minus base weight). The base is rebuilt
    (`tiny_model()`, same seed as `tiny_base`): the engine wrapped the fixture's linears."""
    plain = tiny_model()
    base_sd = {k: v.clone() for k, v in plain.state_dict().items()}
    out = copy.deepcopy(plain)
    sd = out.state_dict()
    for name, w in weights.items():
        merged = PeftModel.from_pretrained(copy.deepcopy(plain), adapter_dir / name).merge_and_unload().state_dict()
        for k in sd:
            sd[k] += w * (merged[k] - base_sd[k])
    out.load_state_dict(sd)
    return out.eval()


def _reference(model, tokenizer_ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs from a plain model (no cache, recomputed each step)."""
    ids, lps = list(tokenizer_ids), []
    with torch.no_grad():
        for _ in range(n):
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
            tok = int(logp.argmax())
            ids.append(tok)
            lps.append(float(logp[tok]))
    return ids[len(tokenizer_ids):], lps


def test_mixture_equals_merged_deltas(switch, tiny_base, adapter_dir):
    weights = {"alpha": 0.7, "beta": 0.3, "gamma": 1.5}
    params = SamplingParams(max_new_tokens=6, logprobs=0, stop_ids=set())
    spec = "+".join(f"{n}:{w}" for n, w in weights.items())
    for model in (spec, weights):  # the string and the {name: weight} form are one thing
        answers = switch.chat(PROMPTS, model=model, params=params)
        merged = _merged(adapter_dir, weights)
        for prompt, got in zip(PROMPTS, answers):
            want_ids, want_lps = _reference(merged, tiny_base.chat_ids(prompt), 6)
            assert got.token_ids == want_ids
            assert max(abs(g.logprob - w) for g, w in zip(got.logprobs, want_lps)) < 1e-4
            assert got.routing["mixture"] == weights and got.routing["adapter"] == list(weights)
            assert all(e["adapters"] == weights for e in got.trace)
    # and it is not the base, nor any single adapter
    assert answers[0].logprobs != switch.chat(PROMPTS[:1], model="base", params=params)[0].logprobs


def test_weight_one_is_the_adapter_alone(switch):
    params = SamplingParams(max_new_tokens=6, logprobs=0, stop_ids=set())
    for name in ("alpha", "gamma"):
        alone = switch.chat(PROMPTS, model=name, params=params)
        mixed = switch.chat(PROMPTS, model=f"{name}:1", params=params)
        for a, m in zip(alone, mixed):
            assert a.token_ids == m.token_ids
            assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, m.logprobs)) < 1e-5
    zero = switch.chat(PROMPTS, model="alpha:0+beta:0", params=params)
    base = switch.chat(PROMPTS, model="base", params=params)
    assert [z.token_ids for z in zero] == [b.token_ids for b in base]
    assert all(math.isclose(z.logprob, b.logprob, abs_tol=1e-5) for z, b in zip(zero[0].logprobs, base[0].logprobs))


def test_allow_and_deny_restrict_token_routing(switch):
    """Arrow (auto's fallback here) routes every token; with allow / deny it never picks the others."""
    params = SamplingParams(max_new_tokens=8)
    free = switch.chat(PROMPTS, params=params)
    used = {a for g in free for e in g.trace for a in e["adapters"]}
    assert len(used) >= 2, used  # unrestricted, several adapters take tokens
    only = switch.chat(PROMPTS, params=params, allow=["gamma"])
    assert {a for g in only for e in g.trace for a in e["adapters"]} <= {"gamma"}
    denied = switch.chat(PROMPTS, params=params, deny=sorted(used)[:1])
    assert sorted(used)[0] not in {a for g in denied for e in g.trace for a in e["adapters"]}
