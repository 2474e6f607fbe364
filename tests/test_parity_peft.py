"""Numerical parity with PEFT: same base, same adapters, same logits and greedy tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from loraswitch.base import Base
from loraswitch.engine import Engine
from loraswitch.generate import SamplingParams, explicit, generate
from loraswitch.kernels import Routing
from loraswitch.layers import MultiLoRALinear, RoutingContext
from tests.conftest import tiny_model, write_adapter

NAMES = ["alpha", "beta", "gamma"]


def _peft(base_model, adapter_dir, names=NAMES):
    model = PeftModel.from_pretrained(copy.deepcopy(base_model), adapter_dir / names[0], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(adapter_dir / n, adapter_name=n)
    return model.eval()


def _batch(n=4, length=12, vocab=49152, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g)


def test_single_adapter_logits_match_peft(tiny_base, adapter_dir):
    peft = _peft(tiny_base.model, adapter_dir)
    engine = Engine(tiny_base, [adapter_dir])
    ids = _batch()
    for name in NAMES:
        peft.set_adapter(name)
        with torch.no_grad():
            want = peft(input_ids=ids).logits
        got = engine.logits(ids, routing=Routing.single(ids.numel(), engine.slot_of(name)))
        assert (got - want).abs().max().item() < 1e-4, name
    with peft.disable_adapter(), torch.no_grad():
        base_want = peft(input_ids=ids).logits
    assert (engine.logits(ids) - base_want).abs().max().item() < 1e-5


def test_mixed_batch_matches_peft_adapter_names(tiny_base, adapter_dir):
    peft = _peft(tiny_base.model, adapter_dir)
    engine = Engine(tiny_base, [adapter_dir])
    rows = ["alpha", "gamma", "__base__", "beta", "alpha", "beta"]
    ids = _batch(len(rows), 16, seed=1)
    with torch.no_grad():
        want = peft(input_ids=ids, adapter_names=rows).logits
    slots = [engine.slot_of(r) if r != "__base__" else -1 for r in rows]
    routing = Routing(torch.tensor(slots).repeat_interleave(ids.shape[1])[:, None], torch.ones(ids.numel(), 1))
    got = engine.logits(ids, routing=routing)
    assert (got - want).abs().max().item() < 1e-4


def test_kernel_strategies_agree(tiny_base, adapter_dir, monkeypatch):
    """Stacked (inference, few adapters), gather (decode) and grouped (prefill) compute the same
    mixture, with top-2 routing, "no adapter" choices and zero weights mixed in."""
    import loraswitch.kernels as k

    engine = Engine(tiny_base, [adapter_dir])
    ids = _batch(3, 10, seed=2)
    g = torch.Generator().manual_seed(3)
    slots = torch.randint(-1, 3, (ids.numel(), 2), generator=g)
    weights = torch.rand(ids.numel(), 2, generator=g)
    weights[::7] = 0.0
    out = {}
    for name, stack_cols, gather_pairs in (("stacked", 10**9, 0), ("gather", 0, 10**9), ("grouped", 0, 0)):
        monkeypatch.setattr(k, "STACK_MAX_COLS", stack_cols)
        monkeypatch.setattr(k, "GATHER_MAX_PAIRS", gather_pairs)
        out[name] = engine.logits(ids, routing=Routing(slots, weights))
    assert (out["stacked"] - out["gather"]).abs().max().item() < 1e-4
    assert (out["gather"] - out["grouped"]).abs().max().item() < 1e-4
    assert not torch.allclose(out["gather"], engine.logits(ids), atol=1e-3)


@pytest.mark.parametrize("weight", [0.5, 1.0], ids=["stacked", "uniform"])
def test_cached_factors_follow_adapter_changes(tiny_base, adapter_dir, tmp_path, weight):
    """The stacked and uniform strategies cache derived factors per layer; replacing an adapter
    in the same slot must never serve the old factors."""
    engine = Engine(tiny_base, [adapter_dir])
    name = engine.names[0]
    ids = _batch(2, 6, seed=4)

    def routing(slot: int) -> Routing:
        if weight == 1.0:  # one adapter for every token: the uniform strategy
            return Routing.single(ids.numel(), slot)
        return Routing(torch.tensor([[slot, -1]] * ids.numel()), torch.tensor([[weight, 0.0]] * ids.numel()))

    before = engine.logits(ids, routing=routing(engine.slot_of(name)))
    if weight == 1.0:  # the uniform strategy's cached transposed factors
        assert any(layer.stacked_cache for layer in engine.layers.values())
    else:  # the stacked strategy's whole-stack buffers
        assert all(layer.A_all.shape[1] > 0 for layer in engine.layers.values())
    write_adapter(tiny_base.model, tmp_path / name, r=4, targets=("q_proj", "v_proj"), seed=99)
    engine.remove_adapter(name)
    engine.load_adapter(tmp_path / name)
    after = engine.logits(ids, routing=routing(engine.slot_of(name)))
    other = Base(model=tiny_model(), tokenizer=tiny_base.tokenizer, name="tiny-llama", source="random")
    fresh = Engine(other, [tmp_path]).logits(ids, routing=routing(0))
    assert not torch.allclose(before, after, atol=1e-4)
    assert (after - fresh).abs().max().item() < 1e-4


def test_token_mixture_matches_dense_definition(tiny_base, adapter_dir):
    """y = Wx + sum_e w[t,e] s_e B_e A_e x on one layer, against the dense formula."""
    engine = Engine(tiny_base, [adapter_dir])
    key = "model.layers.0.self_attn.v_proj"
    layer = engine.layers[key]
    x = torch.randn(5, 64)
    ids = torch.tensor([[0, 2], [2, -1], [-1, -1], [0, 0], [2, 0]])
    w = torch.tensor([[0.3, 0.7], [1.0, 0.0], [1.0, 1.0], [0.5, 0.5], [0.9, 0.1]])
    with engine.routed(Routing(ids, w)), torch.no_grad():
        got = layer(x)
    want = layer.base(x).clone()
    for t in range(5):
        for e, wt in zip(ids[t].tolist(), w[t].tolist()):
            if e >= 0:
                adapter = engine.adapters[engine.name_of(e)]
                if key in adapter.modules:
                    want[t] += wt * adapter.modules[key].delta() @ x[t]
    assert (got - want).abs().max().item() < 1e-5


def test_greedy_tokens_match_peft_generate(tiny_base, adapter_dir):
    tok = tiny_base.tokenizer
    prompts = [tiny_base.chat_ids(p) for p in ["hello there", "what is two plus two?", "x"]]
    pefts = {name: _peft(tiny_base.model, adapter_dir, [name]) for name in NAMES}  # before wrapping
    engine = Engine(tiny_base, [adapter_dir])
    params = SamplingParams(max_new_tokens=12, stop_ids=set())
    for name in NAMES:
        ours = generate(engine, prompts, explicit(engine, [name] * 3), params)
        peft = pefts[name]
        for p, res in zip(prompts, ours):
            with torch.no_grad():
                ids = torch.tensor([p])  # explicit mask: <|im_end|> is also the pad id
                out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                    eos_token_id=None, pad_token_id=tok.pad_token_id, min_new_tokens=12)
            assert res.token_ids == out[0, len(p):].tolist(), name


def test_mixed_batch_generation_equals_one_at_a_time(tiny_base, adapter_dir):
    """Rows of one batch with different adapters (and left padding) decode exactly as alone."""
    engine = Engine(tiny_base, [adapter_dir])
    prompts = [tiny_base.chat_ids(p) for p in ["a", "a much longer prompt with more words", "mid length one", "b"]]
    names = ["alpha", "beta", None, "gamma"]
    params = SamplingParams(max_new_tokens=10, stop_ids=set())
    batch = generate(engine, prompts, explicit(engine, names), params)
    for p, n, res in zip(prompts, names, batch):
        alone = generate(engine, [p], explicit(engine, [n]), params)[0]
        assert res.token_ids == alone.token_ids
        assert res.trace[0]["adapters"] == ({n: 1.0} if n else {})


def test_layer_keeps_every_adapters_factors_under_per_token_routing(tiny_base, adapter_dir, tmp_path):
    """Per-token routing at batch 1 is the uniform strategy with a new slot most steps: the layer
    keeps each adapter's contiguous factors (they were rebuilt about every other step with room for
    4), and a subclass of nn.Linear keeps its own forward."""
    for i in range(6):
        write_adapter(tiny_base.model, tmp_path / f"x{i}", r=4, targets=("q_proj", "v_proj"), seed=10 + i)
    engine = Engine(tiny_base, [tmp_path])
    ids = _batch(1, 1, seed=5)
    for name in engine.names:
        engine.logits(ids, routing=Routing.single(1, engine.slot_of(name)))
    assert all(len(layer.stacked_cache) == 6 for layer in engine.layers.values())

    class Doubling(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    lin = Doubling(4, 3)
    layer = MultiLoRALinear(lin, "p", RoutingContext())
    assert not layer.plain
    x = torch.randn(2, 4)
    torch.testing.assert_close(layer(x), 2 * torch.nn.functional.linear(x, lin.weight, lin.bias))
