"""The selector's fast head (issue 17: `auto` at most 1.1x naming the adapter): a lower layer
decides whole prompts first, the main head the ones it sends to no adapter; the feature pass
reads several layers at once and batches rows by length."""

from __future__ import annotations

import torch

from loraswitch.engine import Engine
from loraswitch.routing import seq as seq_module
from loraswitch.routing.base import NONE_CLASS
from loraswitch.routing.features import _groups, layer_features, prompt_features
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


def test_rows_are_batched_by_length():
    # equal lengths: one batch; a long row among short ones: its own batch; never over max_rows
    assert _groups([5] * 8, 32) == [(0, 8)]
    assert _groups([3, 3, 3, 3, 3, 3, 3, 200], 32, pass_cost=16) == [(0, 7), (7, 8)]
    assert all(b - a <= 3 for a, b in _groups([4] * 10, 3))
    assert _groups([], 4) == []
