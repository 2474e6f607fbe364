"""Adapter refusals: each class of bad input gets a specific error, and never stops the others."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraswitch.engine import Engine
from loraswitch.library import AdapterError, read_adapter, scan
from tests.conftest import tiny_model, write_adapter


def _corrupt_weights(path, fn):
    f = path / "adapter_model.safetensors"
    tensors = load_file(f)
    save_file({k: v.contiguous() for k, v in fn(tensors).items()}, f)


@pytest.fixture
def library(tmp_path, tiny_base, adapter_dir):
    """The three good adapters plus one bad adapter of every refusal class."""
    root = adapter_dir
    model = tiny_base.model
    bad = {}
    bad["no_config"] = write_adapter(model, root / "no_config")
    (root / "no_config" / "adapter_config.json").unlink()
    bad["bad_json"] = write_adapter(model, root / "bad_json")
    (root / "bad_json" / "adapter_config.json").write_text("{not json")
    bad["not_lora"] = write_adapter(model, root / "not_lora")
    cfg = json.loads((root / "not_lora" / "adapter_config.json").read_text())
    (root / "not_lora" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    bad["dora"] = write_adapter(model, root / "dora", use_dora=True)
    bad["pickle"] = write_adapter(model, root / "pickle")
    w = load_file(root / "pickle" / "adapter_model.safetensors")
    (root / "pickle" / "adapter_model.safetensors").unlink()
    torch.save(w, root / "pickle" / "adapter_model.bin")
    bad["truncated"] = write_adapter(model, root / "truncated")
    data = (root / "truncated" / "adapter_model.safetensors").read_bytes()
    (root / "truncated" / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    bad["nan"] = write_adapter(model, root / "nan")
    _corrupt_weights(root / "nan", lambda t: {k: (v.fill_(float("nan")) if "lora_B" in k else v) for k, v in t.items()})
    bad["huge"] = write_adapter(model, root / "huge")  # finite, but 1e17 times too large: swamps the layer
    _corrupt_weights(root / "huge", lambda t: {k: (v * 1e17 if "lora_B" in k else v) for k, v in t.items()})
    bad["embedding"] = write_adapter(model, root / "embedding")  # as PEFT saves one: the base layer comes first
    _corrupt_weights(root / "embedding", lambda t: {**t, "base_model.model.model.embed_tokens.base_layer.weight":
                                                    torch.zeros(3, 3), "base_model.model.model.embed_tokens.lora_embedding_A":
                                                    torch.zeros(4, 3)})
    bad["wrong_base"] = root / "wrong_base"
    other = tiny_model(seed=1)
    other.model.layers[0].self_attn.q_proj = torch.nn.Linear(64, 64, bias=False)
    import copy

    bigger = copy.deepcopy(other)
    bigger.config.hidden_size = 32
    write_adapter(tiny_model(seed=2), root / "wrong_base_src")
    _corrupt_weights(root / "wrong_base_src", lambda t: {k: (v[:, :32] if "lora_A" in k else v) for k, v in t.items()})
    shutil.move(root / "wrong_base_src", bad["wrong_base"])
    bad["missing_module"] = write_adapter(model, root / "missing_module")
    _corrupt_weights(root / "missing_module", lambda t: {k.replace("layers.1.", "layers.7."): v for k, v in t.items()})
    bad["unpaired"] = write_adapter(model, root / "unpaired")
    _corrupt_weights(root / "unpaired", lambda t: {k: v for k, v in t.items() if "layers.0.self_attn.q_proj.lora_B" not in k})
    bad["full_module"] = write_adapter(model, root / "full_module")
    _corrupt_weights(root / "full_module", lambda t: {**t, "base_model.model.lm_head.weight": torch.zeros(3, 3)})
    return root, bad


EXPECTED = {
    "no_config": "missing adapter_config.json",
    "bad_json": "corrupt adapter_config.json",
    "not_lora": "is not LoRA",
    "dora": "DoRA",
    "pickle": "pickle",
    "truncated": "corrupt adapter_model.safetensors",
    "nan": "NaN or Inf",
    "huge": "times the size of the base weights",
    "embedding": "LoRA on embedding layers is not supported",
    "wrong_base": "but the base layer is",
    "missing_module": "which the base model does not have",
    "unpaired": "not its pair",
    "full_module": "not a LoRA factor",
}


def test_each_bad_adapter_is_refused_with_its_reason_and_good_ones_load(tiny_base, library):
    root, bad = library
    engine = Engine(tiny_base, [root])
    assert sorted(engine.names) == ["alpha", "beta", "gamma"]
    assert set(engine.errors) == set(EXPECTED)
    for name, fragment in EXPECTED.items():
        assert fragment in engine.errors[name].reason, (name, engine.errors[name].reason)


def test_duplicate_names_across_folders_are_refused(tmp_path, tiny_base, adapter_dir):
    other = tmp_path / "more"
    write_adapter(tiny_base.model, other / "alpha", seed=9)
    result = scan([adapter_dir, other], tiny_base.model)
    assert sorted(a.name for a in result.adapters) == ["alpha", "beta", "gamma"]
    assert "duplicate name" in result.errors["alpha"].reason


def test_reserved_and_unknown_names(tiny_base, adapter_dir, tmp_path):
    # "mixture" is the server's `model` for a weighted mix; in any case ("AUTO" reads as the router)
    for name in ("auto", "mixture", "AUTO", "Base"):
        shutil.copytree(adapter_dir / "alpha", tmp_path / name)
        with pytest.raises(AdapterError, match="reserved"):
            read_adapter(tmp_path / name, tiny_base.model)
    engine = Engine(tiny_base, [adapter_dir])
    with pytest.raises(AdapterError, match="unknown adapter"):
        engine.slot_of("nope")


def test_scaling_honours_alpha_rank_rslora_and_alpha_pattern(tiny_base, tmp_path):
    model = tiny_base.model
    plain = read_adapter(write_adapter(model, tmp_path / "plain", r=4, alpha=8), model)
    rs = read_adapter(write_adapter(model, tmp_path / "rs", r=4, alpha=8, rslora=True), model)
    pat = read_adapter(write_adapter(model, tmp_path / "pat", r=4, alpha=8, alpha_pattern={"v_proj": 2}), model)
    assert {m.scale for m in plain.modules.values()} == {2.0}
    assert {m.scale for m in rs.modules.values()} == {4.0}
    assert pat.modules["model.layers.0.self_attn.v_proj"].scale == 0.5
    assert pat.modules["model.layers.0.self_attn.q_proj"].scale == 2.0


def test_rank_pattern_gives_mixed_ranks_in_one_adapter(tiny_base, tmp_path):
    a = read_adapter(write_adapter(tiny_base.model, tmp_path / "rp", r=4, rank_pattern={"v_proj": 2}), tiny_base.model)
    assert a.ranks == [2, 4]


def test_add_and_remove_at_run_time_with_slot_reuse(tiny_base, adapter_dir):
    engine = Engine(tiny_base, [adapter_dir])
    ids = torch.randint(3, 1000, (1, 8))
    from loraswitch.kernels import Routing

    before = engine.logits(ids, routing=Routing.single(8, engine.slot_of("gamma")))
    slot = engine.slot_of("alpha")
    engine.remove_adapter("alpha")
    assert "alpha" not in engine.names
    again = engine.load_adapter(adapter_dir / "alpha", name="alpha2")
    assert engine.slot_of(again.name) == slot  # freed slot is reused
    after = engine.logits(ids, routing=Routing.single(8, engine.slot_of("gamma")))
    assert torch.allclose(before, after)


def test_removal_waits_for_in_flight_work(tiny_base, adapter_dir):
    engine = Engine(tiny_base, [adapter_dir])
    slot = engine.slot_of("beta")
    layer = engine.layers["model.layers.0.mlp.down_proj"]
    with engine.pin([slot]):
        engine.remove_adapter("beta")
        assert layer.ranks[slot + 1] == 8  # still computable by the pinned request
        assert "beta" not in engine.names  # but no new request can pick it
    assert layer.ranks[slot + 1] == 0


def test_a_resident_limit_pages_adapters_in_on_use_and_out_lru_between_generations(tiny_base, tokenizer, adapter_dir):
    from loraswitch.base import Base
    from loraswitch.generate import SamplingParams, explicit, generate

    full = Engine(Base(model=tiny_model(), tokenizer=tokenizer, name="tiny-llama", source="random"), [adapter_dir])
    prompts = [[5, 9, 13, 21]] * 3
    want = {n: generate(full, prompts[:1], explicit(full, [n]), SamplingParams(max_new_tokens=6))[0].token_ids
            for n in ("alpha", "beta", "gamma")}
    engine = Engine(tiny_base, [adapter_dir], max_resident=1)  # the same random weights (seed 0)
    assert engine.names == ["alpha", "beta", "gamma"] and engine.resident == ["alpha"]
    assert set(engine.slots) == {"alpha"}  # the others are validated and held in host memory only
    for name in ("gamma", "beta", "alpha", "gamma"):
        got = generate(engine, prompts[:1], explicit(engine, [name]), SamplingParams(max_new_tokens=6))[0].token_ids
        assert got == want[name], name  # paged in on first use, answered as if always resident
        assert engine.resident == [name]  # and the least recently used paged out after the generation
    # one batch over three adapters gets all three for its duration, then drops back to the limit
    out = generate(engine, prompts, explicit(engine, ["alpha", "beta", "gamma"]), SamplingParams(max_new_tokens=6))
    assert [g.token_ids for g in out] == [want["alpha"], want["beta"], want["gamma"]]
    assert engine.resident == ["gamma"]
    assert max(len(layer.ranks) for layer in engine.layers.values()) <= 4  # stacks sized by residency
    engine.remove_adapter("beta")  # removing a paged-out adapter: gone from the library, nothing to free
    with pytest.raises(AdapterError, match="unknown adapter"):
        engine.slot_of("beta")


# ---------------------------------------------------------------------------- hardening (issue 11)
def _with_config(path, **changes):
    cfg_file = path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(changes)
    cfg_file.write_text(json.dumps(cfg))  # NaN / Infinity are written as JSON's extensions, as PEFT would
    return path


def _rank0(tensors):
    out = {}
    for k, v in tensors.items():
        out[k] = torch.zeros(0, v.shape[1]) if ".lora_A." in k else torch.zeros(v.shape[0], 0)
    return out


# every config or tensor the issue's probe got a 500 for (TypeError, ZeroDivisionError) or an
# accepted-but-poisonous adapter: each is now an AdapterError whose reason names the field
BAD_CONFIGS = {
    "alpha_string": ({"lora_alpha": "x"}, "lora_alpha must be a finite number"),
    "alpha_null": ({"lora_alpha": None}, "lora_alpha must be a finite number"),
    "alpha_nan": ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
    "alpha_inf": ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number"),
    "alpha_huge": ({"lora_alpha": 1e30}, "outside the sane range"),
    "alpha_pattern_string": ({"alpha_pattern": {"q_proj": "y"}}, "alpha_pattern['q_proj'] must be a finite number"),
    "rank_huge": ({"r": 100000}, "r must be an integer from 1 to 1024"),
    "rank_zero": ({"r": 0}, "r must be an integer from 1 to 1024"),
    "rslora_string": ({"use_rslora": "yes"}, "use_rslora must be true or false"),
    "targets_missing": ({"target_modules": ["q_proj", "not_a_layer"]}, "does not have: not_a_layer"),
    "targets_type": ({"target_modules": 7}, "target_modules must be a list"),
    # a config whose rank is not the factors' (PEFT refuses it: size mismatch); the scale would be wrong
    "rank_contradicts": ({"r": 8}, "says r 8 but its lora_A has rank 4"),
    "rank_pattern_contradicts": ({"rank_pattern": {"q_proj": 2}}, "says rank_pattern 2 but its lora_A has rank 4"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_fields_are_refused_with_the_field(tiny_base, tmp_path, case):
    changes, reason = BAD_CONFIGS[case]
    path = _with_config(write_adapter(tiny_base.model, tmp_path / case), **changes)
    with pytest.raises(AdapterError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        read_adapter(path, tiny_base.model)


@pytest.mark.parametrize("case", ["rank0", "int32", "huge_rank_tensors"])
def test_bad_tensors_are_refused(tiny_base, tmp_path, case):
    path = write_adapter(tiny_base.model, tmp_path / case)
    if case == "rank0":  # lora_A [0, in] / lora_B [out, 0] was a ZeroDivisionError (500)
        _corrupt_weights(path, _rank0)
        reason = "rank 0"
    elif case == "int32":
        _corrupt_weights(path, lambda t: {k: (v * 100).to(torch.int32) for k, v in t.items()})
        reason = "must be floating point"
    else:
        _corrupt_weights(path, lambda t: {k: (torch.randn(2000, v.shape[1]) if ".lora_A." in k
                                              else torch.randn(v.shape[0], 2000)) for k, v in t.items()})
        reason = "rank 2000"
    with pytest.raises(AdapterError, match=reason):
        read_adapter(path, tiny_base.model)


def test_refusals_are_listed_with_their_reason_and_missing_paths_say_so(tiny_base, tmp_path):
    root = tmp_path / "lib"
    write_adapter(tiny_base.model, root / "good")
    _with_config(write_adapter(tiny_base.model, root / "nan_alpha"), lora_alpha=float("nan"))
    result = scan([root], tiny_base.model)
    assert [a.name for a in result.adapters] == ["good"]
    assert "lora_alpha must be a finite number" in result.errors["nan_alpha"].reason  # what `adapters list` shows
    with pytest.raises(AdapterError) as exc:
        read_adapter(tmp_path / "nowhere", tiny_base.model)
    assert exc.value.missing  # the server answers these with one generic message
    with pytest.raises(AdapterError) as exc:
        read_adapter(root / "nan_alpha", tiny_base.model)
    assert not exc.value.missing


def test_targeted_modules_without_weights_load_with_a_warning(tiny_base, tmp_path):
    """A partial save (factors of one layer gone): it loads, as in PEFT, and says so (PEFT warns
    of missing keys); an adapter whose layers_to_transform narrows its targets is not judged."""
    path = write_adapter(tiny_base.model, tmp_path / "partial")
    _corrupt_weights(path, lambda t: {k: v for k, v in t.items() if "layers.1.self_attn.q_proj" not in k})
    (warning,) = read_adapter(path, tiny_base.model).warnings
    assert "no weights for 1 module(s)" in warning and "layers.1.self_attn.q_proj" in warning
    assert read_adapter(write_adapter(tiny_base.model, tmp_path / "whole"), tiny_base.model).warnings == []
    narrowed = write_adapter(tiny_base.model, tmp_path / "narrowed", layers_to_transform=[0])
    assert read_adapter(narrowed, tiny_base.model).warnings == []


def test_a_scale_at_the_bound_loads_and_rslora_alpha_pattern_still_work(tiny_base, tmp_path):
    path = _with_config(write_adapter(tiny_base.model, tmp_path / "edge", r=4), lora_alpha=1024,
                        alpha_pattern={"v_proj": 2})
    _corrupt_weights(path, lambda t: {k: (v / 256 if "lora_B" in k else v) for k, v in t.items()})  # a sane update
    a = read_adapter(path, tiny_base.model)
    scales = {k.rsplit(".", 1)[-1]: m.scale for k, m in a.modules.items()}
    assert scales == {"q_proj": 256.0, "v_proj": 0.5}

