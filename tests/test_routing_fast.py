"""The selector's fast head (issue 17: `auto` at most 1.1x naming the adapter): a lower layer
decides whole prompts first, the main head the ones it sends to no adapter; the feature pass
reads several layers at once, packs its rows, and hands segmentation's read-ahead to the selector."""

from __future__ import annotations

import torch

from loraswitch.engine import Engine
from loraswitch.routing import features
from loraswitch.routing import seq as seq_module
from loraswitch.routing.base import NONE_CLASS
from loraswitch.routing.features import _bins, _pack, layer_features, prompt_features, read_ahead, reading_ahead
from loraswitch.routing.seq import SequenceRouter, train_selector
from tests.test_routing import _data


def _alone(head: SequenceRouter) -> SequenceRouter:
    """`head` without a fast head of its own: the main head's decisions alone."""
    return SequenceRouter(head.classes, head.W, head.b, head.mean, head.std, head.layer, head.temperature,
                          head.threshold)


def test_fast_head_decides_what_it_routes_and_defers_the_rest(tiny_base, adapter_dir, tmp_path, monkeypatch):
    engine = Engine(tiny_base, [adapter_dir])
    router = train_selector(engine, _data(48), _data(16, offset=50), steps=200, progress=False)
    assert router.fast is not None and router.fast.layer < router.layer
    test = _data(16, offset=90)
    prompts = test["alpha"][:6] + test["beta"][:6] + test[NONE_CLASS][:6]
    fast = router.fast.route(engine, prompts)
    main = _alone(router).route(engine, prompts)

    reads: list[tuple[int, int]] = []
    real = seq_module.prompt_features
    monkeypatch.setattr(seq_module, "prompt_features",
                        lambda e, p, layer, **kw: reads.append((layer, len(p))) or real(e, p, layer, **kw))
    policy = router.policy(engine, prompts)
    deferred = [i for i, d in enumerate(fast) if d.adapter is None]
    assert deferred  # the out-of-suite prompts at least
    assert reads == [(router.fast.layer, len(prompts)), (router.layer, len(deferred))]
    expected = [f if f.adapter is not None else m for f, m in zip(fast, main)]
    assert [(d.adapter, round(d.confidence, 4)) for d in policy.decisions] == \
        [(d.adapter, round(d.confidence, 4)) for d in expected]
    # shift detection reads the main features of the prompts sent to no adapter
    z = (real(engine, [prompts[i] for i in deferred], router.layer) - router.mean) / router.std
    torch.testing.assert_close(policy.features[deferred], z, rtol=1e-4, atol=1e-4)

    router.save(tmp_path)
    loaded = SequenceRouter.load(tmp_path, engine)
    assert loaded.fast.layer == router.fast.layer and torch.equal(loaded.fast.W, router.fast.W)
    assert [d.adapter for d in loaded.route(engine, prompts)] == [d.adapter for d in expected]


def test_a_file_without_a_fast_head_routes_with_its_main_head(tiny_base, adapter_dir, tmp_path):
    engine = Engine(tiny_base, [adapter_dir])
    router = train_selector(engine, _data(32), _data(8, offset=50), steps=100, progress=False, fast=None)
    assert router.fast is None
    router.save(tmp_path)
    loaded = SequenceRouter.load(tmp_path, engine)
    assert loaded.fast is None
    prompts = _data(4, offset=90)["alpha"]
    assert [d.adapter for d in loaded.route(engine, prompts)] == [d.adapter for d in router.route(engine, prompts)]


def test_one_pass_reads_several_layers_in_the_callers_order(tiny_base, adapter_dir):
    engine = Engine(tiny_base, [adapter_dir])
    prompts = ["What is 2 + 2?", "x", "What is 2 + 2?", "Convert to ISO date: March 3 2021, please, now", "x"]
    both = layer_features(engine, prompts, [0, 1], batch_size=2)
    for layer in (0, 1):
        alone = torch.cat([prompt_features(engine, [p], layer) for p in prompts])
        torch.testing.assert_close(both[layer], alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both[1][0], both[1][2])
    assert layer_features(engine, [], [1])[1].shape[0] == 0


def test_rows_are_packed_first_fit_by_decreasing_length():
    # short rows share a sequence as long as the longest row; every row in exactly one bin
    assert _bins([5, 5, 10], 10) == [[2], [0, 1]]
    assert _bins([3, 9, 4, 2, 6], 9) == [[1], [4, 0], [2, 3]]
    found = _bins([7, 1, 3, 8, 2, 2, 5], 8)
    assert sorted(i for b in found for i in b) == list(range(7))
    assert all(sum([7, 1, 3, 8, 2, 2, 5][i] for i in b) <= 8 for b in found)
    assert _bins([], 4) == []
    # the width that leaves the least padding: rows just over half the longest pair up at twice it
    assert _pack([10, 6, 6, 6, 6]) == (12, [[0], [1, 2], [3, 4]])
    assert _pack([4, 4, 4, 4])[0] == 4


def test_packed_rows_read_as_if_alone(tiny_base, adapter_dir):
    """The packed pass (one sequence, a block-diagonal mask) gives each row the features of the
    unshared, left-padded reference pass."""
    engine = Engine(tiny_base, [adapter_dir])
    prompts = ["What is 2 + 2?", "Convert to ISO date: March 3 2021, please, now", "x", "What is 2 + 2?"]
    packed = layer_features(engine, prompts, [0, 1])
    for layer in (0, 1):
        ref = torch.cat([prompt_features(engine, [p], layer, shared_prefix=False) for p in prompts])
        torch.testing.assert_close(packed[layer], ref, rtol=1e-4, atol=1e-5)


def test_a_packed_pass_holds_no_more_tokens_than_padded_rows_did(tiny_base, adapter_dir, monkeypatch):
    engine = Engine(tiny_base, [adapter_dir])
    prompts = ["What is 2 + 2?", "x", "y", "z", "Convert to ISO date: March 3 2021, please, now", "w", "v"]
    sizes = []
    real = features._run
    monkeypatch.setattr(features, "_run", lambda e, layers, **kw: sizes.append(kw["input_ids"].numel()) or real(e, layers, **kw))
    got = layer_features(engine, prompts, [1], batch_size=2)[1]
    p = len(features._template_prefix(engine))
    longest = max(len(engine.base.chat_ids(x)) - p for x in prompts)
    assert len(sizes) > 1 and max(sizes) <= 2 * longest
    ref = torch.cat([prompt_features(engine, [x], 1, shared_prefix=False) for x in prompts])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_a_read_ahead_hands_each_feature_out_once(tiny_base, adapter_dir, monkeypatch):
    """Segmentation's screen reads the batch's whole prompts with its units; the selector's next
    call takes them instead of computing them again, once per time each was read, inside the
    batch's `reading_ahead` scope only."""
    engine = Engine(tiny_base, [adapter_dir])
    units, later = ["What is 2 + 2?", "x"], ["Convert to ISO date: March 3 2021", "y z", "y z"]
    scope = reading_ahead()
    scope.__enter__()
    got = read_ahead(engine, units, 1, later)
    torch.testing.assert_close(got, prompt_features(engine, units, 1), rtol=1e-4, atol=1e-5)
    computed = []
    real = features.layer_features
    monkeypatch.setattr(features, "layer_features",
                        lambda e, p, layers, *a, **kw: computed.append(list(p)) or real(e, p, layers, *a, **kw))
    asked = ["y z", "new", "y z", "Convert to ISO date: March 3 2021", "y z"]
    out = prompt_features(engine, asked, 1)
    assert computed == [["new", "y z"]]  # the third "y z" was read ahead twice only
    torch.testing.assert_close(out, real(engine, asked, [1])[1], rtol=1e-4, atol=1e-5)
    computed.clear()
    prompt_features(engine, ["Convert to ISO date: March 3 2021"], 1)  # handed out already
    assert computed == [["Convert to ISO date: March 3 2021"]]
    read_ahead(engine, [], 1, ["a"])
    read_ahead(engine, [], 1, [])  # a new read-ahead drops what the last one kept
    computed.clear()
    prompt_features(engine, ["a"], 1)
    assert computed == [["a"]]
    read_ahead(engine, [], 1, ["b"])
    scope.__exit__(None, None, None)  # the batch's scope ends: what it kept goes with it
    computed.clear()
    prompt_features(engine, ["b"], 1)
    assert computed == [["b"]]
    with reading_ahead():  # the units read are kept too: segmentation asks for some again (`_fast_picks`)
        read_ahead(engine, units, 1, [])
        computed.clear()
        prompt_features(engine, units[:1], 1)
        assert computed == []
    assert len(read_ahead(engine, ["c"], 1, ["d"])) == 1 and computed[-1] == ["c"]  # outside a scope: `later` unread


def test_a_higher_read_resumes_from_where_a_lower_one_stopped(tokenizer, monkeypatch):
    """Inside a `resuming` scope, reading texts at layer 4 after layer 1 runs layers 2-4 over the
    kept layer-1 hidden states (layers 0-1 run for the texts never read before only), and the
    features are those of a pass from the first token; outside a scope nothing is kept."""
    from loraswitch.base import Base
    from tests.conftest import tiny_model

    engine = Engine(Base(model=tiny_model(layers=6), tokenizer=tokenizer, name="tiny-llama", source="random"), [])
    stack = features.decoder_layers(engine.model)
    calls = [0] * len(stack)
    for i, layer in enumerate(stack):
        layer.register_forward_pre_hook(lambda _m, _a, i=i: calls.__setitem__(i, calls[i] + 1))
    seen = ["What is 2 + 2?", "Convert to ISO date: March 3 2021, please", "x"]
    asked = [seen[1], "never read", seen[0], seen[0]]
    reference = layer_features(engine, asked, [1, 4], shared_prefix=False)
    layer_features(engine, ["warm"], [2, 4])  # the template's prefix, read once per model and layers
    with features.resuming():
        layer_features(engine, seen, [1])
        calls[:] = [0] * len(stack)
        got = layer_features(engine, asked, [2, 4])
    assert calls[0] == calls[1] == 1 and calls[2] == calls[4] == 2  # "never read" alone from layer 0
    torch.testing.assert_close(got[4], reference[4], rtol=1e-4, atol=1e-5)
    with features.resuming():  # a fresh scope: nothing from the last one
        calls[:] = [0] * len(stack)
        layer_features(engine, [seen[0]], [2, 4])
    assert calls[0] == 1
