"""A library that grows: the trained selector keeps its classes when adapters are added (each new
one gets a head of its own, from examples or zero-shot) or removed, on tiny random models."""

from __future__ import annotations

import time

import pytest
import torch

from loraswitch.engine import Engine
from loraswitch.routing import added as added_module
from loraswitch.routing.added import EXAMPLES, ZERO_SHOT, ZERO_SHOT_CLAIM_RATE, added_dir
from loraswitch.routing.base import NONE_CLASS
from loraswitch.routing.seq import RESERVOIR, SequenceRouter, train_selector
from loraswitch.routing.zeroshot import VARIANTS, adapter_factor, quadratic_scores

DATES = ["Convert to ISO date: March {} 20{:02d}", "What is May {}, 19{:02d} as an ISO date?"]
SUMS = ["What is {} + {}?", "Add {} and {}."]
PIG = ["Say {} in pig latin", "Pig latin for the word {} please"]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle", "forest", "window", "rocket",
         "pepper", "garden", "silver", "dragon", "castle"]


def _data(n: int, offset: int = 0) -> dict[str, list[str]]:
    return {
        "alpha": [DATES[i % 2].format(i % 28 + 1, (i * 7 + offset) % 100) for i in range(n)],
        "beta": [SUMS[i % 2].format(i * 3 + offset, i * 11 + 5) for i in range(n)],
        NONE_CLASS: [f"Write a poem about the {w} number {i + offset}" for i, w in enumerate(["sea", "moon", "tree", "sky"] * (n // 4))],
    }


def _pig(n: int, offset: int = 0) -> list[str]:
    return [PIG[i % 2].format(WORDS[(i + offset) % len(WORDS)] + "s" * ((i + offset) // len(WORDS))) for i in range(n)]


@pytest.fixture
def trained(tiny_base, adapter_dir, tmp_path):
    """alpha and beta trained (gamma is loaded but has no training data: it is 'added')."""
    added_module._MEMORY.clear()
    engine = Engine(tiny_base, [adapter_dir / "alpha", adapter_dir / "beta"])
    router = train_selector(engine, _data(48), _data(16, offset=50), steps=200, progress=False)
    router.save(tmp_path / "routers")
    return engine, tmp_path / "routers"


def test_selector_file_keeps_a_reservoir_per_class(trained):
    engine, routers = trained
    router = SequenceRouter.load(routers, engine)
    counts = torch.bincount(router.reservoir.labels).tolist()
    assert counts == [min(RESERVOIR, 48)] * 3 and router.reservoir.z.dtype == torch.float16
    assert router.trained_at is not None and not router.added


def test_added_adapter_from_examples_claims_its_prompts_and_leaves_the_rest(trained, adapter_dir):
    engine, routers = trained
    test = _data(16, offset=90)
    known = test["alpha"] + test["beta"] + test[NONE_CLASS]
    before = [(d.adapter, d.confidence) for d in SequenceRouter.load(routers, engine).route(engine, known)]

    engine.load_adapter(adapter_dir / "gamma", examples=_pig(20))
    router = SequenceRouter.load(routers, engine)
    head = router.added["gamma"]
    assert head.source == EXAMPLES and head.n_examples == 20
    assert (routers / "added" / "gamma.safetensors").is_file()
    mine = router.route(engine, _pig(16, offset=40))
    assert sum(d.adapter == "gamma" for d in mine) >= 14
    assert all(d.source == EXAMPLES and "from 20 examples" in d.reason for d in mine if d.adapter == "gamma")
    # the trained selector's none class knows nothing of gamma's task: its claims carry no none_probability
    assert all(d.none_probability is None for d in mine if d.adapter == "gamma")
    assert all(d.none_probability is not None for d in mine if d.source == "trained")
    after = router.route(engine, known)
    unclaimed = [(d.adapter, d.confidence) for d in after]
    same = sum(a == b for a, b in zip(before, unclaimed))
    assert same >= len(known) - 2  # only what the new head claims can change, and it claims little
    assert all(d.source == "trained" for d, b in zip(after, before) if (d.adapter, d.confidence) == b)

    # a restart routes the same way: the head comes back from disk, not refitted
    added_module._MEMORY.clear()
    again = SequenceRouter.load(routers, engine)
    assert again.added["gamma"].since == head.since
    assert [d.adapter for d in again.route(engine, _pig(16, offset=40))] == [d.adapter for d in mine]

    # removing it removes its class
    engine.remove_adapter("gamma")
    gone = SequenceRouter.load(routers, engine).route(engine, _pig(4, offset=40))
    assert all("gamma" not in d.scores and d.adapter != "gamma" for d in gone)


def test_after_growth_the_main_layer_reads_only_what_the_fast_head_is_unsure_of(trained, adapter_dir, monkeypatch):
    """`auto`'s cost once the library has grown (issue 17): an added head is scored on the main
    features, half a prefill, so the prompts the fast head picks a trained adapter for at
    FAST_SURE or more keep that pick unread; the rest are read there, resuming from the fast
    pass (layer 0 runs once), and may be claimed. The same cascade on features read once
    (`features.precomputed`, what benchmarks pass) decides the same. Restricted to adapters no
    added head is for, nothing is read at the main layer for a pick; with an added one allowed,
    every pick is (renormalized confidences would skip more)."""
    from loraswitch.routing import features as features_module
    from loraswitch.routing import seq as seq_module
    from loraswitch.routing.features import precomputed, prompt_features, read_ahead, reading_ahead

    engine, routers = trained
    engine.load_adapter(adapter_dir / "gamma", examples=_pig(20))
    router = SequenceRouter.load(routers, engine)
    test = _data(16, offset=90)
    prompts = test["alpha"][:8] + test["beta"][:8] + _pig(8, offset=40) + test[NONE_CLASS][:4]
    fast = router.fast.route_features(engine, prompt_features(engine, prompts, router.fast.layer))
    sure = [i for i, d in enumerate(fast) if d.adapter is not None and d.confidence >= seq_module.FAST_SURE]
    assert sure, [(d.adapter, d.confidence) for d in fast]  # in-suite prompts the fast head is sure of
    passes = []
    real = features_module.layer_features
    monkeypatch.setattr(features_module, "layer_features", lambda e, p, layers, *a, **kw: passes.append((tuple(layers), len(p))) or real(e, p, layers, *a, **kw))
    monkeypatch.setattr(seq_module, "layer_features", features_module.layer_features)
    first = features_module.decoder_layers(engine.model)[0]
    runs = []
    hook = first.register_forward_pre_hook(lambda *_: runs.append(1))
    decisions = router.route(engine, prompts)
    hook.remove()
    assert passes == [((router.fast.layer,), len(prompts)), ((router.layer,), len(prompts) - len(sure))]
    assert len(runs) == 1  # the main layer's read went on from the fast pass's hidden states
    assert all(decisions[i].adapter == fast[i].adapter and decisions[i].source == "trained" for i in sure)
    assert sum(d.adapter == "gamma" for d in decisions[16:24]) >= 6  # the new task's prompts still claimed
    passes.clear()
    with reading_ahead():  # as segmentation's screen leaves them: the fast features at hand
        read_ahead(engine, [], router.fast.layer, prompts)
        passes.clear()
        ahead = router.route(engine, prompts)
    assert passes == [((router.layer,), len(prompts) - len(sure))]
    assert [(d.adapter, round(d.confidence, 3)) for d in ahead] == [(d.adapter, round(d.confidence, 3)) for d in decisions]
    feats = {layer: prompt_features(engine, prompts, layer) for layer in (router.fast.layer, router.layer)}
    again, _ = router.cascade(engine, prompts, read=precomputed(prompts, feats))
    assert [(d.adapter, round(d.confidence, 3)) for d in again] == [(d.adapter, round(d.confidence, 3)) for d in decisions]
    reads = []
    counted = precomputed(prompts, feats)
    router.cascade(engine, prompts, frozenset({"alpha", "beta"}), read=lambda e, t, layer: reads.append((layer, len(t))) or counted(e, t, layer))
    picked = [i for i, d in enumerate(router.fast.route_features(engine, feats[router.fast.layer], frozenset({"alpha", "beta"}))) if d.adapter]
    assert reads == [(router.fast.layer, len(prompts)), (router.layer, len(prompts) - len(picked))]
    reads.clear()
    router.cascade(engine, prompts, frozenset({"alpha", "gamma"}), read=lambda e, t, layer: reads.append((layer, len(t))) or counted(e, t, layer))
    assert reads == [(router.fast.layer, len(prompts)), (router.layer, len(prompts))]


def test_added_adapter_without_examples_is_routed_zero_shot_and_calibrated(trained, adapter_dir):
    engine, routers = trained
    engine.load_adapter(adapter_dir / "gamma")
    router = SequenceRouter.load(routers, engine)
    head = router.added["gamma"]
    assert head.source == ZERO_SHOT and head.U is not None
    raw = router.raw_reservoir()
    claimed = router.added.claims(raw, (raw - router.mean) / router.std, engine).margins[:, 0] > 0
    assert claimed.float().mean() <= ZERO_SHOT_CLAIM_RATE + 1 / len(claimed)
    decisions = router.route(engine, ["What is 3 + 4?", "hello"])
    assert all(d.source in ("trained", ZERO_SHOT) for d in decisions)


def test_removed_trained_adapter_abstains_instead_of_misrouting(trained):
    engine, routers = trained
    engine.remove_adapter("beta")
    router = SequenceRouter.load(routers, engine)
    decisions = router.route(engine, _data(8, offset=70)["beta"])
    assert all(d.adapter != "beta" and "beta" not in d.scores for d in decisions)


def test_an_added_adapter_takes_over_the_task_of_a_trained_one_that_is_removed(trained, adapter_dir):
    """A v2 added under a new name with the task's examples: while v1 (a trained class) is
    loaded, its prompts stay with v1; once v1 is removed, the added head claims them (the gone
    class's centroid no longer counts as a competitor), instead of the selector abstaining."""
    engine, routers = trained
    engine.load_adapter(adapter_dir / "gamma", name="beta_v2", examples=_data(20, offset=30)["beta"])
    sums = _data(16, offset=70)["beta"]
    both = SequenceRouter.load(routers, engine).route(engine, sums)
    assert sum(d.adapter == "beta" for d in both) >= 14
    engine.remove_adapter("beta")
    router = SequenceRouter.load(routers, engine)
    after = router.route(engine, sums)
    assert sum(d.adapter == "beta_v2" for d in after) >= 14, [(d.adapter, d.reason) for d in after]
    others = router.route(engine, _data(16, offset=70)["alpha"])
    assert sum(d.adapter == "alpha" for d in others) >= 14  # the classes still loaded keep their prompts


def test_allow_that_leaves_nothing_says_so_rather_than_out_of_suite(trained):
    engine, routers = trained
    decisions = SequenceRouter.load(routers, engine).route(engine, _data(4, offset=70)["alpha"], frozenset())
    assert all(d.adapter is None and "leave no adapter" in d.reason for d in decisions)


def test_unwritable_router_dir_keeps_heads_in_memory(trained, adapter_dir):
    engine, routers = trained
    (routers / "added").write_text("not a folder")  # makes writing heads there fail
    engine.load_adapter(adapter_dir / "gamma")
    head = SequenceRouter.load(routers, engine).added["gamma"]
    assert head.where.startswith("kept in memory only")


def test_embedded_library_additions_go_to_the_cache(monkeypatch, tmp_path):
    from loraswitch.constants import DEMO_ROUTER_DIR

    monkeypatch.setenv("LORASWITCH_CACHE", str(tmp_path / "cache"))
    assert added_dir(DEMO_ROUTER_DIR) == tmp_path / "cache" / "routers" / "demo" / "routers" / "added"
    assert added_dir(tmp_path / "mine") == (tmp_path / "mine" / "added").resolve()


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_shot_factor_is_the_pooled_quadratic_form(tiny_base, adapter_dir, variant):
    engine = Engine(tiny_base, [adapter_dir])
    adapter = engine.adapters["alpha"]  # q_proj and v_proj of both layers: all read the stream
    U = adapter_factor(engine, adapter, variant, rank=64)  # 64 = hidden size: no truncation
    h = torch.randn(3, 64)
    got = quadratic_scores(torch.cat([h, h], 1), U, U.shape[1])[:, 0] / 2
    if variant == "subspace":  # mean over modules of ||Q^T (g * h)||^2 / ||h||^2
        terms = []
        for key, m in adapter.modules.items():
            gain = engine.model.get_submodule(key.rsplit(".", 2)[0]).input_layernorm.weight
            Q = torch.linalg.qr(m.A.T)[0]
            terms.append(((gain * h) @ Q).pow(2).sum(-1))
        assert torch.allclose(got, torch.stack(terms).mean(0) / h.pow(2).sum(-1), rtol=1e-3)
    assert (got > 0).all()


def test_server_learns_an_adapter_from_posted_examples_and_lists_how_each_is_routed(trained, adapter_dir):
    import httpx

    from loraswitch.server import ServerSettings, create_app
    from loraswitch.switch import Switch
    from tests.server.conftest import LiveServer

    engine, routers = trained
    switch = Switch(engine.base, [adapter_dir / "alpha", adapter_dir / "beta"], router_dir=routers)
    server = LiveServer(create_app(switch, ServerSettings(max_new_tokens=8, default_max_tokens=4)))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            card = http.post("/v1/adapters", json={"path": str(adapter_dir / "gamma"), "examples": _pig(20)}).json()
            assert card["routing"]["source"] == EXAMPLES and "from 20 examples" in card["routing"]["routed"]
            listed = {a["id"]: a["routing"] for a in http.get("/v1/adapters").json()["data"]}
            assert listed["alpha"]["source"] == "trained" and listed["gamma"]["source"] == EXAMPLES
            bad = http.post("/v1/adapters", json={"path": str(adapter_dir / "gamma"), "name": "g2", "examples": [""]})
            assert bad.status_code == 400
            assert (routers / "added" / "gamma.safetensors").is_file()
            assert http.delete("/v1/adapters/gamma").status_code in (200, 202)
            deadline = time.monotonic() + 30  # removed between batches: the head goes with it
            while (routers / "added" / "gamma.safetensors").exists():
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        server.stop()
