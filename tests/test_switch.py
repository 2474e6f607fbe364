"""The library's one answering path (`loraswitch.switch`): the numbered-parts grammar, the
streaming events (token / switch / done) that `Switch.chat` collects and the server streams,
incremental text and stop strings, part-by-part answers of prompts that mix tasks, and logprobs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from loraswitch.generate import SamplingParams, TokenLogprob
from loraswitch.numbered import numbered, parse_numbered, split_parts
from loraswitch.routing.base import Decision, Router
from loraswitch.switch import Switch
from loraswitch.switch.parts import PartsError, TokenPool, fan_out, part_budget, pooled_lengths, separator_ids
from loraswitch.switch.request import Done, Failed, Handle, Request, Started, Switched, Token
from loraswitch.switch.text import Detokenizer, StopStrings


@pytest.fixture
def switch(tiny_base, adapter_dir, tmp_path):
    return Switch(tiny_base, [adapter_dir], router_dir=tmp_path / "no_routers")  # auto = arrow here


class _KeywordRouter(Router):
    """Routes by a keyword in the text, so a test knows every part's adapter in advance."""

    name = "kw"
    fans_out = True

    def route(self, engine, prompts, allowed=None):
        table = {"date": "alpha", "sum": "gamma"}
        out = []
        for p in prompts:
            hit = next((a for k, a in table.items() if k in p), None)
            out.append(Decision(hit, 0.9 if hit else 0.2, reason="" if hit else "no keyword"))
        return out


PARTS = ["the date part", "a sum part", "something else"]
COMPOSITE = numbered(PARTS, header="Answer each part on its own line.")


# ---------------------------------------------------------------------------- the grammar
def test_numbered_parts_grammar():
    assert split_parts("Answer each part.\n1. Add 1 and 2.\n2. Sort: 3, 1") == ["Add 1 and 2.", "Sort: 3, 1"]
    assert split_parts("1. only one part") is None
    assert split_parts("2. out of order\n1. x") is None
    assert split_parts("1.5 is a number\n2. no") is None  # "1.5" is not a numbered line
    assert split_parts(COMPOSITE) == PARTS
    assert numbered(["a", "b"]) == "1. a\n2. b"
    assert parse_numbered("1. x\n2) y\n2. z", 3) == ["x", "y", ""]  # the first line numbered k wins
    assert parse_numbered(numbered(["3, 7", "dix"]), 2) == ["3, 7", "dix"]


def test_part_budget_and_fan_out(tiny_base):
    parts = fan_out(Request.chat(COMPOSITE, max_tokens=40, system="be brief"), tiny_base)
    overhead = sum(len(separator_ids(tiny_base.tokenizer, k)) for k in (1, 2, 3))
    assert [p.route_text(tiny_base) for p in parts] == PARTS
    assert {p.max_tokens for p in parts} == {40 - overhead}  # the parts share what the separators leave
    assert parts[0].messages[0] == {"role": "system", "content": "be brief"}  # the conversation is kept
    assert fan_out(Request.chat("plain"), tiny_base) is None
    assert fan_out(Request(prompt=COMPOSITE), tiny_base) is None  # raw completions are not split
    assert part_budget(40, 3, 10) == 10
    with pytest.raises(PartsError, match="too small for 3 parts") as exc:  # no part left without a token
        fan_out(Request.chat(COMPOSITE, max_tokens=overhead + 2), tiny_base)
    assert exc.value.code == "max_tokens_too_small"
    with pytest.raises(PartsError, match="at most 2") as exc:
        fan_out(Request.chat(COMPOSITE, max_tokens=40), tiny_base, max_parts=2)
    assert exc.value.code == "too_many_parts"


# ---------------------------------------------------------------------------- text
def test_detokenizer_matches_full_decode_and_holds_unfinished_characters(tokenizer):
    text = "Grüße, naïve café — 東京 🎉 done."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tokenizer)
    deltas = [detok.add(t) for t in ids]
    assert "".join(deltas) == detok.text == tokenizer.decode(ids)
    assert all("\ufffd" not in d for d in deltas)
    assert detok.ends == sorted(detok.ends) and detok.ends[-1] == len(text)
    assert detok.complete(len(text)) == len(ids) and detok.complete(0) == 0
    pieces, nxt = detok.pieces(detok.text, 0, len(text), [{"adapters": {"a": 1.0}}] * len(ids))
    assert "".join(p["text"] for p in pieces) == text and nxt == len(ids)


def test_stop_strings_find_incrementally_and_hold_back():
    stops = StopStrings(["END", "xyz"])
    assert stops.find("abc E") is None and stops.holdback("abc E") == 1
    assert stops.find("abc EN") is None and stops.holdback("abc EN") == 2
    assert stops.find("abc END and xyz") == 4 and stops.hit == "END"  # which one: the answer's stop_reason
    assert StopStrings(["cdx", "bcdy"]).holdback("abcd") == 3
    assert StopStrings(["xyz"]).holdback("abc") == 0
    assert not StopStrings([])


# ---------------------------------------------------------------------------- streaming
def _stream(switch, requests):
    events: dict[int, list] = {}
    for i, ev in switch.stream(requests):
        events.setdefault(i, []).append(ev)
    return events


def test_stream_events_add_up_to_chat_answers(switch):
    switch._routers[("auto", switch.engine.version)] = _KeywordRouter()
    params = SamplingParams(max_new_tokens=30)
    prompts = ["a lone date question", COMPOSITE, "hello"]
    models = ["auto", "auto", "beta"]
    expected = [switch.chat([p], model=m, params=params)[0] for p, m in zip(prompts, models)]
    events = _stream(switch, [Request.chat(p, model=m, max_tokens=30) for p, m in zip(prompts, models)])
    for i, exp in enumerate(expected):
        evs = events[i]
        assert isinstance(evs[0], Started) and isinstance(evs[-1], Done)
        assert [type(e) for e in evs[1:-1]] and all(isinstance(e, Token | Switched) for e in evs[1:-1])
        done = evs[-1].answer
        assert done.text == exp.text and done.token_ids == exp.token_ids and done.routing == exp.routing
        tokens = [e for e in evs if isinstance(e, Token)]
        assert "".join(t.text for t in tokens) == exp.text
        pieces = [p for t in tokens for p in t.pieces]
        assert "".join(p["text"] for p in pieces) == exp.text
    # a multi-part answer: one switch per part, at the part's first answer token, in order
    switches = [e for e in events[1] if isinstance(e, Switched)]
    assert [(s.part, s.adapter) for s in switches] == [(1, "alpha"), (2, "gamma"), (3, None)]
    first_of = {k: next(i for i, t in enumerate(expected[1].trace) if t["part"] == k and not t.get("separator"))
                for k in (1, 2, 3)}
    assert [s.token_index for s in switches] == [first_of[k] for k in (1, 2, 3)]
    assert events[1][0].batch["fan_out"] == 3


def test_stop_strings_and_per_request_limits_in_one_batch(switch):
    full = switch.chat(["hello"], model="alpha", params=SamplingParams(max_new_tokens=16))[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    handles = {}
    got = {}
    for key, req in {"stop": Request.chat("hello", model="alpha", max_tokens=16, stop=(stop,)),
                     "short": Request.chat("hello", model="alpha", max_tokens=3),
                     "long": Request.chat("hello", model="beta", max_tokens=16)}.items():
        handles[key] = Handle(req, emit=lambda e, k=key: got.setdefault(k, []).append(e))
    batches = switch.run(list(handles.values()))
    assert len(batches) == 1 and batches[0]["size"] == 3  # explicit models share one forward
    stopped = got["stop"][-1].answer
    assert stopped.text == full[: full.find(stop)] and stopped.finish_reason == "stop"
    assert "".join(e.text for e in got["stop"] if isinstance(e, Token)) == stopped.text  # never streamed past it
    assert len(got["short"][-1].answer.token_ids) == 3 and got["short"][-1].answer.finish_reason == "length"


def test_closing_the_stream_cancels_and_errors_are_events(switch):
    stream = switch.stream([Request.chat("hello", model="alpha", max_tokens=30)])
    seen = [next(stream) for _ in range(3)]
    stream.close()  # the row leaves the batch; the thread ends
    assert isinstance(seen[0], tuple) and not any(isinstance(e, Done) for _, e in seen)
    events = _stream(switch, [Request.chat("x", model="nope"), Request.chat("x", model="auto", route="seq")])
    assert isinstance(events[0][-1], Failed) and "nope" in str(events[0][-1].error)
    assert isinstance(events[1][-1], Failed) and "unavailable" in str(events[1][-1].error)
    with pytest.raises(Exception, match="nope"):
        switch.chat(["x"], model="nope")


def test_requests_are_held_to_the_context_and_to_sane_sampling(switch):
    """What no decode can honour is refused when the request is made; a prompt that fills the
    context (the tiny model's is 256) fails alone and at once; max_tokens is cut to what is left."""
    for bad, why in {"max_tokens": (0, "max_tokens"), "temperature": (float("nan"), "temperature"),
                     "top_p": (2.0, "top_p"), "logprobs": (100000, "logprobs"), "stop": (("",), "stop")}.items():
        with pytest.raises(ValueError, match=why[1]):
            Request.chat("hello", **{bad: why[0]})
    assert Request.chat("x", allow="alpha").allow == ("alpha",)  # one name, not its letters
    events = _stream(switch, [Request.chat("word " * 300, model="alpha"), Request.chat("hello", model="alpha"),
                              Request(prompt="", model="alpha"),
                              Request.chat("hello", model="alpha", max_tokens=400, ignore_eos=True)])
    assert isinstance(events[0][-1], Failed) and "context holds 256" in str(events[0][-1].error)
    assert isinstance(events[1][-1], Done)  # the rest of the batch is answered
    assert isinstance(events[2][-1], Failed) and "empty" in str(events[2][-1].error)
    cut = events[3][-1].answer
    assert cut.finish_reason == "length" and len(cut.prompt_ids) + len(cut.token_ids) == 256
    assert len(switch.chat("hello", model="alpha", allow=None)) == 1  # one prompt given as a string


def test_a_named_adapter_reads_like_a_routers_decision(switch):
    named, base = switch.chat(["hello"], model="alpha")[0], switch.chat(["hello"], model="base")[0]
    assert named.routing == {"router": None, "adapter": "alpha", "confidence": 1.0}
    assert base.routing["adapter"] is None


# ---------------------------------------------------------------------------- part by part
def _parts_alone(switch, max_tokens):
    """COMPOSITE's parts each asked alone with the whole pool, cut to what each keeps when they
    share it (what `loraswitch eval`'s oracle does)."""
    pool = fan_out(Request.chat(COMPOSITE, max_tokens=max_tokens), switch.base)[0].max_tokens
    alone = [switch.chat([p], model=m, params=SamplingParams(max_new_tokens=pool))[0]
             for p, m in zip(PARTS, ["alpha", "gamma", "base"])]
    kept = pooled_lengths([len(g.token_ids) for g in alone], [g.finish_reason == "stop" for g in alone], pool)
    tok = switch.base.tokenizer
    return [replace(g, token_ids=g.token_ids[:k], text=tok.decode(g.token_ids[:k], skip_special_tokens=True))
            for g, k in zip(alone, kept)]


def test_parts_share_max_tokens_a_part_that_ends_early_gives_the_rest_to_the_others(switch):
    """The pool: a part that stops after a few tokens hands its unused share to the parts still
    writing, and the assembled answer stays within max_tokens."""
    switch._routers[("auto", switch.engine.version)] = _KeywordRouter()
    long = _parts_alone(switch, 400)  # nothing stops in a random model: what each part would write
    early = next(t for i, t in enumerate(long[1].token_ids[2:], 2)
                 if t not in long[1].token_ids[:i] and t not in long[0].token_ids[:60] + long[2].token_ids[:60])
    switch.base._stops = {*switch.base.stop_ids, early}  # part 2 now ends after its first few tokens
    res = switch.chat([COMPOSITE], model="auto", params=SamplingParams(max_new_tokens=60))[0]
    expected = _parts_alone(switch, 60)
    pool = fan_out(Request.chat(COMPOSITE, max_tokens=60), switch.base)[0].max_tokens
    assert len(expected[1].token_ids) < 5 and sum(len(g.token_ids) for g in expected) == pool
    assert len(expected[0].token_ids) > pool // 3 < len(expected[2].token_ids)  # more than an equal share
    written = [[t for t, e in zip(res.token_ids, res.trace) if e["part"] == k and not e.get("separator")] for k in (1, 2, 3)]
    assert written == [g.token_ids for g in expected]  # each part kept what the pool simulation says
    assert len(res.token_ids) <= 60 and res.finish_reason == "length"
    pool = TokenPool(10, 3)
    assert pool.limits == [4, 3, 3]
    pool.end(1, 0)
    assert pool.limits == [6, 0, 4] and sum(pool.limits) == 10
    pool.end(0, 6)
    pool.end(2, 1)
    assert pool.limits == [6, 0, 1]
    # a chained part (2 waits for 1) lends its share to the part it waits for, and gets back what it leaves
    pool = TokenPool(10, 3, waits={2: 1})
    assert pool.limits == [4, 6, 0]
    pool.end(1, 2)
    assert pool.limits == [6, 2, 2] and sum(pool.limits) == 10
    # a chain of three: what the first leaves goes to the part that writes next, not the one still waiting
    pool = TokenPool(12, 3, waits={1: 0, 2: 1})
    assert pool.limits == [12, 0, 0]
    pool.end(0, 4)
    assert pool.limits == [4, 8, 0]
    pool.end(1, 3)
    assert pool.limits == [4, 3, 5]
    assert pooled_lengths([2, 50, 50], [True, False, False], 12) == [2, 5, 5]
    assert pooled_lengths([50, 2, 1], [False, True, True], 12) == [9, 2, 1]


def test_auto_answers_each_part_as_its_own_row(switch):
    """A multi-part prompt fans out: each part is answered exactly as if asked alone with its
    routed adapter (same tokens as an explicit request), then assembled in order."""
    switch._routers[("auto", switch.engine.version)] = _KeywordRouter()
    params = SamplingParams(max_new_tokens=30)
    single = "a lone date question"
    res, alone = switch.chat([COMPOSITE, single], model="auto", params=params)

    expected = _parts_alone(switch, 30)
    assert res.text == "\n".join(f"{k}. {g.text}" for k, g in enumerate(expected, 1))
    assert parse_numbered(res.text, 3) == [g.text.strip() for g in expected]
    assert res.routing["adapter"] == ["alpha", "gamma", None] and res.routing["fan_out"] == 3
    switches = [e for e in res.events if e["event"] == "switch"]
    assert [(e["part"], e["adapter"]) for e in switches] == [(1, "alpha"), (2, "gamma"), (3, None)]
    assert switches[2]["reason"] == "no keyword"
    # the trace labels every token with its part; answer tokens carry their part's adapter
    assert len(res.trace) == len(res.token_ids)
    assert [e["token_index"] for e in switches] == [next(i for i, t in enumerate(res.trace) if t["part"] == k) for k in (1, 2, 3)]
    answer_adapters = {t["part"]: set(t["adapters"]) for t in res.trace if not t.get("separator")}
    assert answer_adapters.get(1, {"alpha"}) == {"alpha"} and answer_adapters.get(2, {"gamma"}) == {"gamma"}
    assert switch.base.tokenizer.decode(res.token_ids).split() == res.text.split()
    # a single-task prompt in the same call is untouched by the fan-out
    assert alone.text == switch.chat([single], model="alpha", params=params)[0].text
    assert "fan_out" not in alone.routing


def test_a_stop_string_ends_the_whole_multi_part_answer(switch):
    """OpenAI's contract for the assembled answer: it ends before the first stop string, in a
    part's text (later parts are dropped) or in a separator the assembly would write."""
    switch._routers[("auto", switch.engine.version)] = _KeywordRouter()
    full = switch.chat([COMPOSITE], model="auto", params=SamplingParams(max_new_tokens=30))[0]
    second, third = full.text.find("\n2. "), full.text.find("\n3. ")
    p2 = full.text[second + 4 : third]
    stop = p2[len(p2) // 2 : len(p2) // 2 + 3]
    assert len(stop) == 3 and stop not in full.text[: second + 4]  # the cases below are what they say
    for stops, want, parts in (((stop,), full.text[: full.text.find(stop)], 2), (("\n2. ",), full.text[:second], 1)):
        events = _stream(switch, [Request.chat(COMPOSITE, max_tokens=30, stop=stops)])[0]
        answer = events[-1].answer
        if parts == 2:  # part 2 stopped early, so part 1 had its unused tokens (the pool) and wrote on
            head, tail = want[:second], want[second:]
            assert answer.text.startswith(head) and answer.text.endswith(tail) and len(answer.text) > len(want)
            want = answer.text
        assert answer.text == want and answer.finish_reason == "stop" and answer.stop_reason == stops[0]
        assert "".join(e.text for e in events if isinstance(e, Token)) == want  # never streamed past it
        assert answer.routing["fan_out"] == parts  # the parts the answer holds


# ---------------------------------------------------------------------------- logprobs
def _reference_logprobs(switch, adapter, ids):
    """log_softmax of the engine's own logits for `ids` under one adapter (no generate involved)."""
    from loraswitch.kernels import Routing

    routing = Routing.single(len(ids), switch.engine.slot_of(adapter))
    return torch.log_softmax(switch.engine.logits(torch.tensor([ids]), routing=routing)[0].float(), -1)


def test_logprobs_and_echo_are_the_models(switch):
    prompt = "Once upon a time"
    req = Request(prompt=prompt, model="gamma", max_tokens=4, logprobs=2, echo=True)
    done = [e for _, e in switch.stream([req]) if isinstance(e, Done)][0].answer
    ids = done.prompt_ids + done.token_ids
    ref = _reference_logprobs(switch, "gamma", ids)
    assert done.prompt_logprobs[0] is None and len(done.prompt_logprobs) == len(done.prompt_ids)
    for j, lp in enumerate(done.prompt_logprobs[1:] + done.logprobs, 1):
        assert isinstance(lp, TokenLogprob) and lp.token_id == ids[j] and len(lp.top) == 2
        assert lp.logprob == pytest.approx(float(ref[j - 1, ids[j]]), abs=1e-4)
        assert lp.top[0][1] == pytest.approx(float(ref[j - 1].max()), abs=1e-4) and lp.top[0][1] >= lp.top[1][1]
    assert all(lp.logprob == lp.top[0][1] for lp in done.logprobs)  # greedy: the likeliest token


def test_each_request_gets_the_logprobs_it_asked_for_in_a_shared_batch(switch):
    """A batch computes the most alternatives any row asked for; each answer reports its own k
    (a review found a request for 1 answered with 5 when batched with one for 5)."""
    reqs = [Request(prompt="Once upon a time", model="gamma", max_tokens=3, logprobs=k, echo=True) for k in (5, 1, 0)]
    reqs.append(Request(prompt="Once upon a time", model="gamma", max_tokens=3, echo=True))
    done, sizes = {}, set()
    for i, e in switch.stream(reqs):
        if isinstance(e, Done):
            done[i] = e.answer
            sizes.add(e.batch["size"])
    assert sizes == {4}  # decoded together
    for i, k in enumerate((5, 1, 0)):
        lps = done[i].logprobs + done[i].prompt_logprobs[1:]
        assert lps and all(len(lp.top) == k for lp in lps), (k, [len(lp.top) for lp in lps])
    assert done[3].logprobs == [] and done[3].prompt_logprobs == []
    assert done[0].logprobs[0].top[0] == done[1].logprobs[0].top[0]


def test_multi_part_logprobs_cover_every_token(switch):
    switch._routers[("auto", switch.engine.version)] = _KeywordRouter()
    events = _stream(switch, [Request.chat(COMPOSITE, model="auto", max_tokens=24, logprobs=1)])[0]
    done = events[-1].answer
    assert [lp.token_id for lp in done.logprobs] == done.token_ids
    seps = [lp for lp, t in zip(done.logprobs, done.trace) if t.get("separator")]
    assert seps and all(lp.logprob == 0.0 for lp in seps)  # written by the assembly: probability 1
    streamed = [lp for e in events if isinstance(e, Token) for lp in e.logprobs]
    assert streamed == done.logprobs


def test_assembled_parts_keep_each_decisions_source(tokenizer):
    """routing.parts says, per part, where its decision came from (the trained selector, a head
    learned from examples, or a zero-shot head), as a single-part answer's routing does."""
    from loraswitch.generate import Generation
    from loraswitch.switch.parts import assemble

    parts = [Generation([], [5], "x", "stop", routing={"adapter": "a", "confidence": 0.9, "source": "trained"}),
             Generation([], [6], "y", "stop", routing={"adapter": "b", "confidence": 0.8, "source": "examples",
                                                       "reason": "head from 20 examples"})]
    out = assemble(tokenizer, parts, "auto")
    assert [p.get("source") for p in out.routing["parts"]] == ["trained", "examples"]
    assert out.routing["adapter"] == ["a", "b"]


def test_ignore_eos_decodes_past_the_stop_tokens_in_a_batch_of_its_own(switch):
    """vLLM's `ignore_eos`: the answer runs to max_tokens through what would have ended it, and
    such requests never share a forward with ordinary ones (a batch has one set of stop tokens)."""
    first = switch.chat(["hello"], model="alpha", params=SamplingParams(max_new_tokens=6))[0].token_ids[0]
    switch.base._stops = {first}  # the answer's own first token now ends it
    got: dict[str, list] = {}
    handles = [Handle(Request.chat("hello", model="alpha", max_tokens=6, ignore_eos=flag),
                      emit=lambda e, k=flag: got.setdefault(k, []).append(e)) for flag in (False, True)]
    batches = switch.run(handles)
    assert len(batches) == 2
    stopped, forced = got[False][-1].answer, got[True][-1].answer
    assert stopped.token_ids == [] and stopped.finish_reason == "stop"
    assert len(forced.token_ids) == 6 and forced.token_ids[0] == first and forced.finish_reason == "length"
    assert Request.chat("x", ignore_eos=True).sampling_key != Request.chat("x").sampling_key


def test_naming_a_refused_adapter_says_why_it_was_refused(tiny_base, tmp_path):
    """An adapter refused when the library loaded is named with its reason, not as unknown."""
    import json

    from loraswitch.library import AdapterError
    from tests.conftest import write_adapter

    path = write_adapter(tiny_base.model, tmp_path / "lib" / "broken")
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": "x"}))
    switch = Switch(tiny_base, [tmp_path / "lib"], router_dir=tmp_path / "no_routers")
    with pytest.raises(AdapterError, match="was refused when the library loaded: lora_alpha must be"):
        switch.chat(["hi"], model="broken")
    with pytest.raises(AdapterError, match="unknown adapter 'nope'"):
        switch.chat(["hi"], model="nope")
