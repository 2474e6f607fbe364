"""Routers on tiny random models: Arrow's math, training/saving/loading the learned routers,
stale-library detection. (Part-by-part answering of prompts that mix tasks: tests/test_switch.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from loraswitch.engine import Engine
from loraswitch.generate import SamplingParams, generate
from loraswitch.routing import load_router
from loraswitch.routing.arrow import ArrowRouter, top_right_singular_vector
from loraswitch.routing.base import NONE_CLASS, StaleRouterError
from loraswitch.routing.gate import GateRouter, train_gates
from loraswitch.routing.seq import SequenceRouter, train_selector
from tests.conftest import write_adapter

DATES = ["Convert to ISO date: March {} 20{:02d}", "What is May {}, 19{:02d} as an ISO date?"]
SUMS = ["What is {} + {}?", "Add {} and {}."]


def _data(n: int, offset: int = 0) -> dict[str, list[str]]:
    return {
        "alpha": [DATES[i % 2].format(i % 28 + 1, (i * 7 + offset) % 100) for i in range(n)],
        "beta": [SUMS[i % 2].format(i * 3 + offset, i * 11 + 5) for i in range(n)],
        NONE_CLASS: [f"Write a poem about the {w} number {i + offset}" for i, w in enumerate(["sea", "moon", "tree", "sky"] * (n // 4))],
    }


def test_arrow_prototype_is_top_right_singular_vector(tiny_base, adapter_dir):
    engine = Engine(tiny_base, [adapter_dir])
    for adapter in engine.adapters.values():
        for module in adapter.modules.values():
            v = top_right_singular_vector(module)
            dense = torch.linalg.svd(module.delta().double())[2][0].float()
            assert torch.allclose(v.abs(), dense.abs(), atol=1e-4)


def test_arrow_routes_a_token_to_the_adapter_it_aligns_with(tiny_base, adapter_dir):
    engine = Engine(tiny_base, [adapter_dir])
    router = ArrowRouter(engine, top_k=1)
    key = "model.layers.0.self_attn.v_proj"  # targeted by alpha and gamma
    P, slots = router.prototypes[key]
    routing = router.select(key, P * 3.0)  # each prototype as a token input
    assert routing.ids[:, 0].tolist() == slots.tolist()
    assert torch.allclose(routing.weights, torch.ones_like(routing.weights))


def test_token_routers_score_a_half_precision_model_like_a_full_one(tiny_base, adapter_dir):
    """Arrow's prototypes and the learned gates are fp32; a bf16 model's layer inputs are scored
    in fp32 (a GPU model in bf16 would otherwise fail in the first routed layer)."""
    engine = Engine(tiny_base, [adapter_dir])
    key = "model.layers.0.self_attn.v_proj"
    arrow = ArrowRouter(engine, top_k=1)
    P, slots = arrow.prototypes[key]
    want = arrow.select(key, P * 3.0).ids
    assert torch.equal(arrow.select(key, (P * 3.0).bfloat16()).ids, want)
    gates = {key: torch.randn(3, P.shape[1])}
    gate = GateRouter(engine, gates, ["alpha", "beta"])
    x = torch.randn(5, P.shape[1])
    assert torch.equal(gate.select(key, x.bfloat16()).ids, gate.select(key, x.bfloat16().float()).ids)


def test_arrow_routes_to_a_new_adapter_without_retraining(tiny_base, adapter_dir, tmp_path):
    engine = Engine(tiny_base, [adapter_dir])
    router = ArrowRouter(engine)
    write_adapter(tiny_base.model, tmp_path / "delta", targets=("q_proj",), seed=7)
    engine.load_adapter(tmp_path / "delta")
    key = "model.layers.1.self_attn.q_proj"
    v = top_right_singular_vector(engine.adapters["delta"].modules[key])
    routing = router.select(key, v[None] * 5)
    assert routing.ids[0, 0].item() == engine.slot_of("delta")


def test_token_router_generation_has_a_trace(tiny_base, adapter_dir):
    engine = Engine(tiny_base, [adapter_dir])
    router = ArrowRouter(engine, top_k=2)
    prompts = ["hello", "a longer prompt here"]
    out = generate(engine, [tiny_base.chat_ids(p) for p in prompts], router.policy(engine, prompts),
                   SamplingParams(max_new_tokens=4, stop_ids=set()))
    for res in out:
        assert len(res.trace) == 4
        assert all(set(step["adapters"]) <= {"alpha", "beta", "gamma"} for step in res.trace)
        assert abs(sum(res.trace[0]["adapters"].values()) - 1) < 0.1
        assert res.routing["router"] == "arrow" and res.events


def test_seq_selector_trains_calibrates_abstains_and_detects_stale_library(tiny_base, adapter_dir, tmp_path):
    engine = Engine(tiny_base, [adapter_dir])
    router = train_selector(engine, _data(48), _data(16, offset=50), steps=200, progress=False)
    assert 0.2 <= router.threshold <= 0.7 and router.temperature >= 1.0  # may soften, never sharpen
    low = train_selector(engine, _data(48), _data(16, offset=50), steps=200, progress=False, ceiling=0.25)
    assert low.threshold <= 0.25 and low.fast is not None and low.fast.threshold <= 0.25
    test = _data(16, offset=90)
    decisions = router.route(engine, test["alpha"] + test["beta"])
    picked = [d.adapter for d in decisions]
    assert picked.count("alpha") >= 14 and picked[16:].count("beta") >= 14
    assert sum(d.adapter is None for d in router.route(engine, test[NONE_CLASS])) >= 12
    assert all(0 <= d.confidence <= 1 and set(d.scores) == {"alpha", "beta"} for d in decisions)
    # none_probability: the same quantity whatever was decided (confidence is the decision's own):
    # the scores and it sum to one; where `__none__` won, the confidence is it
    for d in decisions + router.route(engine, test[NONE_CLASS]):
        assert d.none_probability is not None and sum(d.scores.values()) + d.none_probability == pytest.approx(1, abs=2e-3)
        assert d.to_dict()["none_probability"] == d.none_probability
        if d.reason.startswith("out of suite"):
            assert d.confidence == pytest.approx(d.none_probability, abs=1e-4)
        elif d.adapter is not None:
            assert d.none_probability < d.confidence

    router.save(tmp_path)
    loaded = SequenceRouter.load(tmp_path, engine)
    assert [d.adapter for d in loaded.route(engine, test["alpha"][:4])] == picked[:4]
    # a router trained on another feature recipe is refused, not silently misrouted
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "seq_router.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["loraswitch"])
    old = tmp_path / "old"
    old.mkdir()
    save_file(load_file(path), old / path.name, metadata={"loraswitch": json.dumps({**meta, "features": "raw-mean-last"})})
    with pytest.raises(StaleRouterError, match="prompt features"):
        SequenceRouter.load(old, engine)
    # a library that grows is not stale (`test_routing_growth.py`); changed weights still are
    engine.remove_adapter("alpha")
    write_adapter(tiny_base.model, tmp_path / "retrained" / "alpha", targets=("q_proj", "v_proj"), seed=11)
    engine.load_adapter(tmp_path / "retrained" / "alpha")
    with pytest.raises(StaleRouterError, match="alpha has different weights"):
        SequenceRouter.load(tmp_path, engine)
    with pytest.warns(UserWarning, match="using arrow"):
        auto = load_router(engine, "auto", tmp_path)  # auto falls back instead of misrouting
    assert "using arrow" in auto.route(engine, ["What is 1 + 2?"])[0].reason


def test_gates_train_save_and_refuse_a_reordered_library(tiny_base, adapter_dir, tmp_path):
    engine = Engine(tiny_base, [adapter_dir])
    data = {k: [(p, "42") for p in v[:8]] for k, v in _data(8).items() if k != "beta"}
    router = train_gates(engine, data, epochs=2, lm_steps=2, batch_size=4, progress=False)
    assert set(router.gates) == set(engine.layers)
    assert all(not g.requires_grad and g.abs().sum() > 0 for g in router.gates.values())
    router.save(tmp_path)
    GateRouter.load(tmp_path, engine)
    other = Engine(type(tiny_base)(model=__import__("tests.conftest", fromlist=["tiny_model"]).tiny_model(),
                                   tokenizer=tiny_base.tokenizer, name="t", source="t"))
    other.load_adapter(adapter_dir / "gamma")  # a different order / subset of the library
    other.load_adapter(adapter_dir / "alpha")
    with pytest.raises(StaleRouterError):
        GateRouter.load(tmp_path, other)
