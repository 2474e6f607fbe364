"""Continuous batching in `generate`: rows that join a running batch (`admit`) answer exactly as
they would alone, whatever adapters the batch mixes, however their prefill is chunked, and with
a token limit of their own; joining is refused where it is not safe."""

from __future__ import annotations

import pytest

from loraswitch.engine import Engine
from loraswitch.generate import Joining, Listener, RowsPolicy, SamplingParams, explicit, generate
from loraswitch.routing.arrow import ArrowRouter

GREEDY = SamplingParams(max_new_tokens=6, temperature=0, stop_ids=set())  # no stop: every row runs to its limit


@pytest.fixture
def engine(tiny_base, adapter_dir):
    return Engine(tiny_base, [adapter_dir])


def _alone(engine, prompt, name, n):
    params = SamplingParams(max_new_tokens=n, temperature=0, stop_ids=set())
    return generate(engine, [prompt], explicit(engine, [name]), params)[0].token_ids


class Arrivals:
    """An `admit` that hands in each group at the step it is due (counted in calls), and records
    what the batch held when it asked."""

    def __init__(self, groups):
        self.groups = dict(groups)  # call index -> Joining
        self.calls, self.held = 0, []

    def __call__(self, held):
        self.held.append(held)
        self.calls += 1
        return self.groups.pop(self.calls - 1, None)


class Order(Listener):
    def __init__(self):
        self.seen = []

    def token(self, row, gen):
        self.seen.append(row)


def test_joined_rows_answer_as_alone_with_mixed_adapters_and_their_own_limit(engine):
    prompts = [engine.base.chat_ids(p) for p in ("one", "two two", "a longer third prompt here", "four", "5")]
    names = ["alpha", "beta", "gamma", None, "alpha"]
    limits = [6, 6, 9, 4, 3]  # row 2 joins and outlives the running batch's 6
    want = [_alone(engine, p, n, k) for p, n, k in zip(prompts, names, limits)]
    engine.prefixes = None  # the joined prefill starts from the same (empty) prefix cache as the batch
    admit = Arrivals({2: Joining(prompts[2:4], explicit(engine, names[2:4]), 9),
                      4: Joining(prompts[4:], explicit(engine, names[4:]), 3)})

    class Limits(Order):
        def token(self, row, gen):
            super().token(row, gen)
            return "length" if len(gen.token_ids) >= limits[row] else None

    listener = Limits()
    out = generate(engine, prompts[:2], explicit(engine, names[:2]), GREEDY, listener, admit=admit, prefill_chunk=4)
    assert [g.token_ids for g in out] == want
    assert [g.finish_reason for g in out] == ["length"] * 5
    assert out[2].trace[0]["adapters"] == {"gamma": 1.0} and out[3].trace[0]["adapters"] == {}
    assert admit.held[:3] == [2, 2, 2]  # it is told how many rows the batch holds
    assert len(out[2].token_ids) == 9 > GREEDY.max_new_tokens


def test_chunked_prefill_gives_the_one_shot_tokens_and_keeps_the_batch_decoding(engine):
    long = engine.base.chat_ids("a long prompt " * 12)
    short = [engine.base.chat_ids(p) for p in ("one", "two two")]
    engine.prefix_tokens = 0  # the chunks run the whole prompt (the prefix path is the other test's)
    runs = {}
    for chunk in (4, 10_000):
        listener = Order()
        out = generate(engine, short, explicit(engine, ["alpha", "beta"]), GREEDY, listener,
                       admit=Arrivals({1: Joining([long], explicit(engine, ["gamma"]), 6)}), prefill_chunk=chunk)
        runs[chunk] = ([g.token_ids for g in out], listener.seen)
    assert runs[4][0] == runs[10_000][0] == [*(_alone(engine, p, n, 6) for p, n in zip(short, ["alpha", "beta"])),
                                             _alone(engine, long, "gamma", 6)]
    chunks = -(-len(long) // 4)
    # one-shot: the joined row answers from the next step on; chunked: the running rows produce
    # tokens while its prompt is read, a chunk per step, and it starts only after
    assert runs[10_000][1].index(2) < runs[4][1].index(2)
    assert runs[4][1][: runs[4][1].index(2)].count(0) >= min(chunks, GREEDY.max_new_tokens - 1)


def test_joins_through_the_prefix_cache_and_after_the_batch_drained(engine):
    prompts = [engine.base.chat_ids(p) for p in ("first question", "second question", "third one")]
    want = [_alone(engine, p, "beta", 6) for p in prompts]
    assert engine.prefixes.hits > 0  # the shared chat opening is cached by now
    hits = engine.prefixes.hits
    short = SamplingParams(max_new_tokens=1, temperature=0, stop_ids=set())
    admit = Arrivals({0: Joining(prompts[1:], explicit(engine, ["beta", "beta"]), 6)})
    out = generate(engine, prompts[:1], explicit(engine, ["beta"]), short, admit=admit, prefill_chunk=3)
    assert [g.token_ids for g in out] == [want[0][:1], *want[1:]]  # row 0 left before the others joined
    assert engine.prefixes.hits > hits


def test_joining_is_not_offered_where_unsafe(engine):
    prompt = [engine.base.chat_ids("one")]
    never = Arrivals({})
    generate(engine, prompt, explicit(engine, ["alpha"]), SamplingParams(max_new_tokens=3, temperature=0.7, seed=1),
             admit=never)
    generate(engine, prompt, explicit(engine, ["alpha"]), SamplingParams(max_new_tokens=3, echo=True), admit=never)
    generate(engine, prompt, ArrowRouter(engine).policy(engine, ["x"]), GREEDY, admit=never)
    assert never.calls == 0
    rows = RowsPolicy([(explicit(engine, ["alpha"]), 0)], 1)
    with pytest.raises(ValueError, match="dynamic"):
        rows.add(ArrowRouter(engine).policy(engine, ["x"]), 1)


def test_cache_is_trimmed_when_a_long_joined_row_leaves(engine, monkeypatch):
    from loraswitch.decode import EagerStepper

    short = [engine.base.chat_ids(p) for p in ("one", "two two")]
    long = engine.base.chat_ids("a long prompt " * 12)
    want = [_alone(engine, p, n, 16) for p, n in zip(short, ["alpha", "beta"])] + [_alone(engine, long, "gamma", 1)]
    widths = []
    trim = EagerStepper.trim

    def spy(self):
        before = self.mask.shape[1]
        trim(self)
        widths.append((before, self.mask.shape[1]))

    monkeypatch.setattr(EagerStepper, "trim", spy)
    params = SamplingParams(max_new_tokens=16, temperature=0, stop_ids=set())
    out = generate(engine, short, explicit(engine, ["alpha", "beta"]), params,
                   admit=Arrivals({1: Joining([long], explicit(engine, ["gamma"]), 1)}), prefill_chunk=16)
    assert [g.token_ids for g in out] == want
    assert any(after < before - 20 for before, after in widths), widths  # the long row's context went with it


def test_a_request_fits_a_running_batch_only_if_it_gets_what_it_asked_for():
    from types import SimpleNamespace

    from loraswitch.switch.request import Request
    from loraswitch.switch.run import _Joins

    greedy = Request.chat("hi", max_tokens=4)
    plain = SimpleNamespace(key=greedy.sampling_key, logprobs=None)  # a greedy batch computing no logprobs
    with_logprobs = SimpleNamespace(key=greedy.sampling_key, logprobs=2)
    assert _Joins.fits(plain, greedy)
    assert not _Joins.fits(plain, Request.chat("hi", max_tokens=4, logprobs=0))  # it would get none
    assert _Joins.fits(with_logprobs, Request.chat("hi", max_tokens=4, logprobs=2))
    assert not _Joins.fits(with_logprobs, Request.chat("hi", max_tokens=4, logprobs=3))
    assert not _Joins.fits(plain, Request.chat("hi", max_tokens=4, temperature=0.8))
    assert not _Joins.fits(plain, Request.chat("hi", max_tokens=4, echo=True))


JOIN_PROMPTS = ("one", "two two", "six", "three", "a long prompt " * 12, "five")
JOIN_NAMES = ["alpha", "beta", None, "gamma", "alpha", None]
JOIN_LIMITS = [2, 6, 6, 5, 6, 3]


class _JoinLimits(Listener):
    def token(self, row, gen):
        return "length" if len(gen.token_ids) >= JOIN_LIMITS[row] else None


def _joins_on_the_static_step(engine, backend, decoder, monkeypatch, admit_at: tuple[int, int]):
    """The static step's join case: three rows start (row 0 leaves after 2 tokens), "three"
    joins at the first of `admit_at`'s calls, the long prompt and "five" at the second. Checks
    that every row answers as it would alone on the eager loop (tokens and logprobs) and returns
    the StaticStepper calls made (`_place`, `_rebuild`, and per step the (slots, live rows))."""
    from loraswitch.static import StaticStepper

    prompts = [engine.base.chat_ids(p) for p in JOIN_PROMPTS]
    engine.prefix_tokens = 0
    alone = [generate(engine, [p], explicit(engine, [n]), SamplingParams(max_new_tokens=k, temperature=0,
                                                                         stop_ids=set(), logprobs=0))[0]
             for p, n, k in zip(prompts, JOIN_NAMES, JOIN_LIMITS)]  # the eager loop
    engine.compile, engine.decoder = backend, decoder
    calls = []
    for method in ("_place", "_rebuild"):
        original = getattr(StaticStepper, method)
        monkeypatch.setattr(StaticStepper, method,
                            lambda self, *a, _o=original, _m=method: calls.append(_m) or _o(self, *a))
    step = StaticStepper.step
    monkeypatch.setattr(StaticStepper, "step",
                        lambda self, *a: calls.append((self.st.mask.shape[0], len(self.live))) or step(self, *a))
    first, second = admit_at
    admit = Arrivals({first: Joining(prompts[3:4], explicit(engine, JOIN_NAMES[3:4]), 5),
                      second: Joining(prompts[4:], explicit(engine, JOIN_NAMES[4:]), 6)})
    params = SamplingParams(max_new_tokens=6, temperature=0, stop_ids=set(), logprobs=0)
    chunk = max(len(q) for q in prompts[:3])  # the first batch in one piece, the long joiner in chunks
    assert len(prompts[4]) > chunk
    out = generate(engine, prompts[:3], explicit(engine, JOIN_NAMES[:3]), params, _JoinLimits(), admit=admit,
                   prefill_chunk=chunk)
    assert [g.token_ids for g in out] == [g.token_ids for g in alone]
    for got, want in zip(out, alone):  # the same distributions, not just the same argmax
        assert [lp.logprob for lp in got.logprobs] == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-4)
    return calls


@pytest.mark.parametrize("backend", ["none", "eager"])
def test_rows_join_the_compiled_step_in_freed_slots_or_a_rebuilt_state(engine, backend, monkeypatch):
    """On the static (compiled) step, joined rows answer as they would alone on the eager loop:
    a short prompt takes the slot of a row that left, in place; a prompt longer than the batch's
    context, or more rows than free slots, rebuilds the state (the batch stays on the static
    step); a batch half of whose slots have left is rebuilt with the live rows only."""
    import loraswitch.static

    monkeypatch.setattr(loraswitch.static, "COMPACT_MIN_LEFT", 1)  # compact as soon as half the slots left
    # "three" after row 0 left (its slot); the long prompt, longer than the batch's context: rebuilt
    raw = _joins_on_the_static_step(engine, backend, None, monkeypatch, (3, 5))
    calls = ["step" if isinstance(c, tuple) else c for c in raw]
    assert calls[0] == "_rebuild", calls  # the prompts, prefilled on an eager cache, copied in
    calls = calls[1:]
    assert "_place" in calls and "_rebuild" in calls, calls
    assert calls.index("_place") < calls.index("_rebuild") < len(calls) - 1 - calls[::-1].index("step"), calls
    assert calls.count("_rebuild") >= 2, calls  # the join, and the batch compacted once half its slots had left
    assert any(a == "_rebuild" and b == (1, 1) for a, b in zip(raw, raw[1:])), raw  # compacted to its live row
    assert engine.decoder.failed is None


def test_slot_rows_are_few_sizes_that_hold_every_batch():
    from loraswitch.static import slot_rows

    sizes = [slot_rows(n) for n in range(1, 41)]
    assert all(s >= n for s, n in zip(sizes, range(1, 41)))
    assert sorted(set(sizes)) == [2, 4, 8, 16, 24, 32, 40]  # one row in two slots: no one-row graph
    assert slot_rows(1) == 2 and slot_rows(9) == 16 and slot_rows(17) == 24  # at most 7 idle slots past 8 rows


def test_with_cuda_graphs_the_static_states_come_in_slot_sizes_and_answer_the_same(engine, monkeypatch):
    """Where the compiled step replays CUDA graphs (`Decoder.graphed`, set on a GPU; here on the
    static path uncompiled), a state holds its rows in slot sizes: the spare slots are masked,
    rows join into them in place, and every row answers as it would alone on the eager loop."""
    from loraswitch.static import Decoder, slot_rows

    decoder = Decoder(None)
    decoder.graphed = True
    # "three" right away, into the spare 4th slot; the long prompt later: rebuilt
    calls = _joins_on_the_static_step(engine, "none", decoder, monkeypatch, (1, 5))
    seen = [c for c in calls if isinstance(c, tuple)]
    assert seen[0] == (4, 3)  # three prompts in a state of four slots
    assert [c for c in calls if isinstance(c, str)][:2] == ["_rebuild", "_place"], calls  # the spare slot taken
    assert all(slots == slot_rows(slots) and slots >= live for slots, live in seen), seen
    assert any(slots > live for slots, live in seen[1:])


def test_graphed_states_are_kept_within_a_memory_bound(engine, monkeypatch):
    """With CUDA graphs up to MAX_GRAPHED_CACHES states are kept (a state made anew records a new
    graph), but not more than GRAPHED_CACHE_BYTES of them unless twice the largest allows it;
    without, two."""
    import loraswitch.static as static

    plain, graphed = static.Decoder(None), static.Decoder(None)
    graphed.graphed = True
    for rows in (1, 2, 4, 8):
        plain.state(engine, rows, 64, 1)
        graphed.state(engine, rows, 64, 1)
    assert list(plain.states) == [(4, 64), (8, 64)]
    assert list(graphed.states) == [(1, 64), (2, 64), (4, 64), (8, 64)]
    one_row = graphed.states[(1, 64)].nbytes
    cfg = engine.model.config
    assert one_row == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 64 * 4
    monkeypatch.setattr(static, "GRAPHED_CACHE_BYTES", 10 * one_row)
    graphed.state(engine, 2, 64, 1)  # used again: the most recent
    graphed.state(engine, 16, 64, 1)  # 31 rows' worth: over the bound, within twice the largest (32)
    assert list(graphed.states) == [(1, 64), (4, 64), (8, 64), (2, 64), (16, 64)]
    graphed.state(engine, 16, 128, 1)  # 63 of 64
    graphed.state(engine, 8, 256, 1)  # 95: the least recently used go until twice the largest holds them
    assert list(graphed.states) == [(16, 128), (8, 256)]


@pytest.mark.parametrize("backend", [None, "none"])
def test_a_short_arrival_is_not_held_behind_a_long_first_prefill(engine, backend):
    """A first batch longer than a chunk is read chunk by chunk like a joining group, so a short
    prompt that arrives meanwhile is admitted, prefilled beside it and answers first; on the
    compiled step the first batch's rows then join the static state the short row made. Every
    row answers as it would alone."""
    long = engine.base.chat_ids("a long prompt " * 20)
    short = engine.base.chat_ids("one")
    engine.prefix_tokens = 0
    want = [_alone(engine, long, "alpha", 6), _alone(engine, short, "beta", 6)]
    engine.compile, engine.decoder = backend, None
    listener = Order()
    admit = Arrivals({1: Joining([short], explicit(engine, ["beta"]), 6)})
    out = generate(engine, [long], explicit(engine, ["alpha"]), GREEDY, listener, admit=admit, prefill_chunk=8)
    assert [g.token_ids for g in out] == want
    assert listener.seen[0] == 1  # the short row's first token came before the long row's
    assert admit.held[:2] == [1, 1] and admit.calls >= 3  # asked between the long prompt's chunks
    engine.compile = None
