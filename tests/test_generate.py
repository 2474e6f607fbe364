"""`generate`: rows of one batch routed by different policies share one forward and answer as
they would alone (left padding, `RowsPolicy`); a listener can end rows early; max_new_tokens=0."""

from __future__ import annotations

import pytest

from loraswitch.engine import Engine
from loraswitch.generate import FixedPolicy, Listener, RowsPolicy, SamplingParams, explicit, generate
from loraswitch.routing.arrow import ArrowRouter


@pytest.fixture
def engine(tiny_base, adapter_dir):
    return Engine(tiny_base, [adapter_dir])


def test_rows_policy_matches_separate_generations(engine):
    prompts = [engine.base.chat_ids(p) for p in ("one", "two two", "three three three")]
    params = SamplingParams(max_new_tokens=5, temperature=0)
    alone = [generate(engine, [p], explicit(engine, [n]), params)[0].token_ids
             for p, n in zip(prompts, ["alpha", "alpha", "beta"])]
    mixed = RowsPolicy([(explicit(engine, ["alpha", "alpha"]), 0), (explicit(engine, ["beta"]), 2)], 3)
    together = generate(engine, prompts, mixed, params)
    assert [g.token_ids for g in together] == alone  # left-padded greedy rows == alone
    assert together[2].trace[0]["adapters"] == {"beta": 1.0}
    arrow = ArrowRouter(engine).policy(engine, ["x"])
    with pytest.raises(ValueError, match="dynamic"):
        RowsPolicy([(arrow, 0), (FixedPolicy([([-1], [1.0])]), 1)], 2)
    assert RowsPolicy([(arrow, 0)], 1).dynamic is not None
    with pytest.raises(ValueError, match="offsets"):
        RowsPolicy([(explicit(engine, ["alpha"]), 1)], 2)


def test_listener_ends_rows_early_and_sees_each_end(engine):
    prompts = [engine.base.chat_ids(p) for p in ("one", "two")]
    seen, ended = [], {}

    class StopRowZero(Listener):
        def token(self, row, gen):
            seen.append((row, gen.token_ids[-1]))
            return "cancelled" if row == 0 and len(gen.token_ids) == 2 else None

        def finished(self, row, gen):
            ended[row] = (gen.finish_reason, gen.text, list(gen.events))

    params = SamplingParams(max_new_tokens=6, stop_ids=set())
    out = generate(engine, prompts, explicit(engine, ["alpha", "gamma"]), params, StopRowZero())
    assert len(out[0].token_ids) == 2 and len(out[1].token_ids) == 6
    assert ended[0][0] == "cancelled" and ended[1][0] == "length"
    assert ended[1][1] == out[1].text and len(seen) == 8
    assert [g.finish_reason for g in generate(engine, prompts, None, SamplingParams(max_new_tokens=0))] == ["length"] * 2


def _answers(engine, prompts, policies, params, listener=None):
    out = {}
    for name, make in policies.items():
        gens = generate(engine, prompts, make(engine), params, listener() if listener else None)
        out[name] = [(g.token_ids, g.finish_reason, [round(lp.logprob, 3) for lp in g.logprobs]) for g in gens]
    return out


POLICIES = {
    "mixed": lambda e: explicit(e, ["alpha", None, "gamma"]),
    "one": lambda e: explicit(e, ["beta"] * 3),
    "top2": lambda e: FixedPolicy([([0, 1], [0.3, 0.7]), ([2], [1.0]), ([1, 2], [0.5, 0.5])]),
}


class _EndRowOne(Listener):
    def token(self, row, gen):
        return "cancelled" if row == 1 and len(gen.token_ids) == 3 else None


@pytest.mark.parametrize("backend", ["none", "eager"])
def test_static_decode_gives_the_eager_tokens(tiny_base, adapter_dir, backend):
    """The static-cache step with fixed-shape slot routing (uncompiled, and traced by dynamo with
    fullgraph=True on the "eager" backend, so a graph break fails here) yields the eager loop's
    tokens and logprobs: explicit, mixed and weighted top-2 rows, a row that ends early."""
    import copy

    prompts = [tiny_base.chat_ids(p) for p in ("one", "two two", "three three three")]
    params = SamplingParams(max_new_tokens=6, stop_ids=set(), logprobs=0)
    want = _answers(Engine(copy.deepcopy(tiny_base), [adapter_dir]), prompts, POLICIES, params, _EndRowOne)
    static = Engine(tiny_base, [adapter_dir], compile=backend)
    assert _answers(static, prompts, POLICIES, params, _EndRowOne) == want
    assert static.decoder.failed is None
    if backend != "none":
        assert set(static.decoder.compile_s) == {(3, 64, 1), (3, 64, 2)}  # one trace per shape, reused


def test_static_step_with_no_adapter_skips_the_lora_term(tiny_base, adapter_dir, monkeypatch):
    """A batch where no row uses an adapter runs the static step without the LoRA term (routed
    to "no adapter", the masked path would multiply every loaded factor by zero), as its own
    compiled graph, with the eager loop's tokens."""
    import copy

    import loraswitch.layers as layers

    prompts = [tiny_base.chat_ids(p) for p in ("one", "two two", "three three three")]
    params = SamplingParams(max_new_tokens=6, stop_ids=set(), logprobs=0)
    policies = {"none": lambda e: explicit(e, [None] * 3)}
    want = _answers(Engine(copy.deepcopy(tiny_base), [adapter_dir]), prompts, policies, params, _EndRowOne)
    static = Engine(tiny_base, [adapter_dir], compile="eager")
    calls = []  # the routing type of every LoRA term computed (the prefill's is a Routing)
    real = layers.add_lora
    monkeypatch.setattr(layers, "add_lora", lambda *a, **k: calls.append(type(a[5]).__name__) or real(*a, **k))
    assert _answers(static, prompts, policies, params, _EndRowOne) == want
    assert "SlotRouting" not in calls and set(static.decoder.compile_s) == {(3, 64, 0)}


def test_compiled_decode_inductor(tiny_base, adapter_dir):
    """torch.compile with inductor (the real thing; slow, so the only test that compiles): the
    same greedy tokens as eager for a mixed batch and for batch 1; a second generation reuses the
    compiled step."""
    import copy

    prompts = [tiny_base.chat_ids(p) for p in ("one", "two two", "three three three")]
    params = SamplingParams(max_new_tokens=5, stop_ids=set())
    eager = Engine(copy.deepcopy(tiny_base), [adapter_dir])
    compiled = Engine(tiny_base, [adapter_dir], compile=True)
    for engine_rows in (prompts, prompts[:1]):
        policy = {3: ["alpha", None, "gamma"], 1: ["beta"]}[len(engine_rows)]
        want = [g.token_ids for g in generate(eager, engine_rows, explicit(eager, policy), params)]
        for _ in range(2):
            got = [g.token_ids for g in generate(compiled, engine_rows, explicit(compiled, policy), params)]
            assert got == want
    assert compiled.decoder.failed is None, compiled.decoder.failed
    assert set(compiled.decoder.compile_s) == {(3, 64, 1), (1, 64, 1)}


def test_answers_end_at_any_chat_structure_token(tiny_base):
    """The stop set is the eos ids plus every special token the chat template writes (a model
    that opens a new turn has finished its answer), and generation stops on any of them."""
    tok = tiny_base.tokenizer
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert {im_start, im_end} | tiny_base.eos_ids <= tiny_base.stop_ids
    engine = Engine(tiny_base)
    prompt = [tiny_base.chat_ids("hello")]
    free = generate(engine, prompt, explicit(engine, [None]), SamplingParams(max_new_tokens=6, stop_ids=set()))[0]
    assert len(free.token_ids) == 6
    tiny_base._stops = {free.token_ids[2]}  # pretend the third token opens a new turn
    cut = generate(engine, prompt, explicit(engine, [None]), SamplingParams(max_new_tokens=6))[0]
    first = free.token_ids.index(free.token_ids[2])
    assert cut.token_ids == free.token_ids[:first] and cut.finish_reason == "stop"  # the stop token is not kept


@pytest.mark.parametrize("compile_step", [False, "none"])  # the eager loop, and the static step's prefill
def test_prefix_cache_serves_shared_openings_with_the_same_tokens(tiny_base, adapter_dir, compile_step):
    """The prefill reuses the keys and values of the chat template's opening that two earlier
    prompts under the same adapter shared (per adapter: LoRA changes them), in a batch mixing
    rows that hit and rows that do not; greedy tokens and logprobs equal the uncached run's. A
    prompt repeated verbatim is not served from its own copy."""
    engine = Engine(tiny_base, [adapter_dir], compile=compile_step)
    prompts = [tiny_base.chat_ids(p) for p in ("one two", "three", "four five six", "seven")]
    names = ["alpha", "beta", "alpha", None]
    params = SamplingParams(max_new_tokens=5, stop_ids=set(), logprobs=0)

    def run(rows):
        gens = generate(engine, [prompts[i] for i in rows], explicit(engine, [names[i] for i in rows]), params)
        return [(g.token_ids, [round(lp.logprob, 3) for lp in g.logprobs]) for g in gens]

    engine.prefix_tokens = 0
    want = run([0, 1, 2, 3])
    engine.prefix_tokens = 2048
    assert run([0]) == want[:1] and run([0]) == want[:1]  # alone and repeated: nothing shared yet
    assert engine.prefixes.hits == 0
    assert run([0, 1, 2, 3]) == want  # rows 0 and 2 (alpha) share the opening: remembered now
    assert engine.prefixes.hits == 0 and len(engine.prefixes.shared) == 1
    assert run([0, 1, 2, 3]) == want  # alpha rows start from it; beta and base run whole
    assert engine.prefixes.hits == 2 and engine.prefixes.saved_tokens >= 2 * 8
    engine.load_adapter(adapter_dir / "gamma", name="gamma2")  # a library change: entries not reused
    assert run([2]) == want[2:3] and engine.prefixes.hits == 2
    store = engine.prefixes
    assert store.size == sum(len(t) for _, t in store.shared) + sum(len(t) for _, t in store.seen)
    engine.prefix_tokens = 3 * len(prompts[0])  # a small budget: the oldest entries leave, the count follows
    run([0, 1, 2, 3])
    store = engine.prefixes
    assert 0 < store.size <= engine.prefix_tokens
    assert store.size == sum(len(t) for _, t in store.shared) + sum(len(t) for _, t in store.seen)


def test_compiled_step_serves_every_batch_of_two_rows_or_more_with_one_graph(tiny_base, adapter_dir):
    """The step's batch dimension is dynamic: after a batch of 3 traced it, batches of 2 and 5
    (same cache bucket) reuse that graph; batch 1 is a graph of its own (traced by dynamo on the
    "eager" backend, which counts graphs as inductor would)."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    engine = Engine(tiny_base, [adapter_dir], compile="eager")
    params = SamplingParams(max_new_tokens=3, stop_ids=set())
    dynamo.reset()
    counters.clear()
    graphs = []
    for rows in (3, 2, 5, 1):
        prompts = [tiny_base.chat_ids("x " * (i + 1)) for i in range(rows)]
        generate(engine, prompts, explicit(engine, ["alpha"] * rows), params)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 1, 1, 2]


class _OneStepEach(Listener):
    def token(self, row, gen):
        return "length" if len(gen.token_ids) >= 2 else None


def test_with_cuda_graphs_the_warm_up_compiles_the_several_rows_graphs_only(tiny_base, adapter_dir):
    """Where the step replays CUDA graphs (`Decoder.graphed`, a GPU's case; here traced by the
    eager backend), one row runs in two slots (`static.slot_rows`), so `warm_up` traces the
    several-rows graphs alone (half of what it compiled: 8 graphs of SmolLM2 did not finish in
    480 s on an H200), and a request alone decodes on them with the eager loop's tokens."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    from loraswitch.generate import warm_up
    from loraswitch.static import Decoder

    engine = Engine(tiny_base, [adapter_dir], compile="eager")
    engine.prefix_tokens = 0
    prompt = [tiny_base.chat_ids("one row alone")]
    params = SamplingParams(max_new_tokens=5, temperature=0, stop_ids=set(), logprobs=0)
    engine.compile = False
    eager = generate(engine, prompt, explicit(engine, ["alpha"]), params)[0]
    engine.compile, engine.decoder = "eager", Decoder("eager")
    engine.decoder.graphed, engine.decoder.any_length = True, False
    dynamo.reset()
    counters.clear()
    assert set(warm_up(engine, 100)) == {(2, n, k) for n in (64, 128) for k in (0, 1)}
    graphs = counters["stats"]["unique_graphs"]
    alone = generate(engine, prompt, explicit(engine, ["alpha"]), params)[0]
    assert alone.token_ids == eager.token_ids
    assert [lp.logprob for lp in alone.logprobs] == pytest.approx([lp.logprob for lp in eager.logprobs], abs=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs and engine.decoder.uncompiled == set()
    assert {rows for rows, _ in engine.decoder.states} == {2}


@pytest.mark.parametrize("any_length", [False, True])
def test_warm_up_compiles_what_a_server_meets_first(tiny_base, adapter_dir, monkeypatch, any_length):
    """`warm_up` traces one row and two rows, routed and not, for each cache length bucket up to
    the context asked, so later batches of those shapes trace nothing new, and freezes the
    decoder; an engine that does not compile is left alone. `any_length` (no CUDA graphs: the
    CPU's case): the cache's length is dynamic from the first compile, so the first bucket's
    graphs serve every bucket; otherwise (CUDA graphs) a bucket not warmed decodes on the eager
    loop."""
    import copy

    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    import loraswitch.decode as decode
    import loraswitch.generate as generate_module
    from loraswitch.generate import warm_up

    assert warm_up(Engine(copy.deepcopy(tiny_base), [adapter_dir])) == {}
    from loraswitch.static import Decoder

    engine = Engine(tiny_base, [adapter_dir], compile="eager")
    engine.decoder = Decoder("eager")
    engine.decoder.any_length = any_length
    dynamo.reset()
    counters.clear()
    assert set(warm_up(engine)) == {(1, 64, 0), (1, 64, 1), (2, 64, 0), (2, 64, 1)}
    graphs = counters["stats"]["unique_graphs"]
    params = SamplingParams(max_new_tokens=3, stop_ids=set())
    generate(engine, [tiny_base.chat_ids("x " * i) for i in range(1, 6)], explicit(engine, ["alpha"] * 5), params)
    generate(engine, [tiny_base.chat_ids("y " * i) for i in range(1, 4)], explicit(engine, [None] * 3), params)
    assert counters["stats"]["unique_graphs"] == graphs == 4
    # frozen, a batch of a bucket it did not compile decodes on the eager loop (a server's rows
    # must not all wait on a compile), with the tokens a compiled step gives
    steppers = []
    real = decode.stepper_for
    monkeypatch.setattr(generate_module, "stepper_for", lambda *a: steppers.append(real(*a)) or steppers[-1])
    prompts, longer = [tiny_base.chat_ids("z " * i) for i in range(1, 4)], SamplingParams(max_new_tokens=70, stop_ids=set())

    def answers(policy, p):
        return [g.token_ids for g in generate(engine, prompts, policy, p, _OneStepEach())]

    if any_length:  # the 64 bucket's graphs take the 128 bucket: the static step, no new graph
        engine.compile = False
        eager = answers(explicit(engine, ["alpha"] * 3), longer)
        engine.compile, steppers[:] = "eager", []
        assert answers(explicit(engine, ["alpha"] * 3), longer) == eager
        assert [type(s).__name__ for s in steppers] == ["StaticStepper"]
        keys = engine.decoder.states[(3, 128)].cache.layers[0].keys
        assert not hasattr(keys, "_dynamo_static_input_type")  # transformers' fixed-address mark, dropped
    else:
        eager = answers(explicit(engine, ["alpha"] * 3), longer)
        assert [type(s).__name__ for s in steppers] == ["EagerStepper"]
        assert all(hasattr(st.cache.layers[0].keys, "_dynamo_static_input_type") for st in engine.decoder.states.values())
    assert counters["stats"]["unique_graphs"] == graphs and engine.decoder.uncompiled == set()
    # a context of 100 positions: the 128 bucket's graphs too (SmolLM2 traces a second length
    # anew, then dynamo makes it symbolic), so any longer bucket decodes compiled with no compile
    assert {(r, n, k) for r in (1, 2) for n in (64, 128) for k in (0, 1)} <= set(warm_up(engine, 100))
    graphs, steppers[:] = counters["stats"]["unique_graphs"], []
    assert answers(explicit(engine, ["alpha"] * 3), longer) == eager
    assert answers(explicit(engine, ["alpha"] * 3), SamplingParams(max_new_tokens=200, stop_ids=set())) == eager
    assert [type(s).__name__ for s in steppers] == ["StaticStepper"] * 2 and engine.decoder.uncompiled == set()
    assert counters["stats"]["unique_graphs"] == graphs and engine.decoder.compile_s[(3, 256, 1)] < 5
    # a step shape it did not compile in a covered bucket (two choices per token) runs
    # uncompiled, with the tokens the compiled step gives once allowed to compile
    top2 = FixedPolicy([([engine.slot_of("alpha"), engine.slot_of("beta")], [0.5, 0.5])] * 3)
    frozen = answers(top2, params)
    assert engine.decoder.uncompiled == {(2, 64, 2)} and counters["stats"]["unique_graphs"] == graphs
    engine.decoder.frozen = False
    assert answers(top2, params) == frozen and (2, 64, 2) in engine.decoder.graphs


@pytest.mark.parametrize("any_length, drop_marks", [(False, True), (True, True), (True, False)])
def test_without_cuda_graphs_one_compiled_graph_serves_every_cache_length(any_length, drop_marks, monkeypatch):
    """With transformers' fixed-address marks on the static cache, a model of SmolLM2's attention
    width (9 heads of 64 over 3 key/value heads; one layer here) traces its first cache length
    bucket for that length alone, and a second bucket traces again: minutes each on a CPU, where
    the marks buy nothing. Dropped (`any_length`, the default without CUDA graphs), one graph
    takes both buckets, with the same tokens. Where the length does not stay symbolic anyway
    (here: the marks kept behind the decoder's back), the decoder notices the second trace and
    stops counting on one graph for every length (`Decoder.covers`)."""
    import torch
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    from loraswitch.bench import config
    from loraswitch.bench.fixtures import make_base, random_adapters
    from loraswitch.generate import FixedPolicy
    from loraswitch.static import Decoder

    monkeypatch.setitem(config.LLAMA_SHAPES, "smollm2-width", (576, 1, 96, 9, 3))
    base = make_base("smollm2-width", torch.device("cpu"), torch.float32)
    engine = Engine(base)
    for a in random_adapters(base.model, 2, 4, 0):
        engine.add_adapter(a)
    prompts = [[torch.randint(3, 30000, (n,), generator=torch.Generator().manual_seed(n)).tolist()] * 3 for n in (20, 100)]
    params, policy = SamplingParams(max_new_tokens=12, stop_ids=set()), FixedPolicy([([0], [1.0])] * 3)
    want = [[g.token_ids for g in generate(engine, p, policy, params)] for p in prompts]
    engine.compile, engine.decoder = "eager", Decoder("eager")
    engine.decoder.any_length = any_length
    if not drop_marks:
        monkeypatch.setattr("loraswitch.static._any_length", lambda st: None)
    dynamo.reset()
    counters.clear()
    assert [[g.token_ids for g in generate(engine, p, policy, params)] for p in prompts] == want
    assert set(engine.decoder.compile_s) == {(3, 64, 1), (3, 128, 1)}
    assert counters["stats"]["unique_graphs"] == (1 if any_length and drop_marks else 2)
    assert engine.decoder.any_length == (any_length and drop_marks)
    assert engine.decoder.covers((2, 256, 1))  # one graph or the second length's symbolic one
