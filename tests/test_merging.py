"""Merging: each method against a hand-worked example, exactness against PEFT's `cat`, the SVD
export and its error report, YAML errors, AdaMerging on a tiny model, and the CLI end to end."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import typer
import yaml
from peft import PeftModel
from typer.testing import CliRunner

from loraswitch.base import Base
from loraswitch.engine import Engine
from loraswitch.kernels import Routing
from loraswitch.layers import MultiLoRALinear
from loraswitch.library import Adapter, LoraModule, read_adapter, scan
from loraswitch.merging import methods as M
from loraswitch.merging.adamerging import adamerge
from loraswitch.merging.cli import merge_command
from loraswitch.merging.config import ConfigError, load_config, parse_config
from loraswitch.merging.export import REPORT_FILE, export_adapter, export_model, svd_factors
from loraswitch.merging.merge import MergeResult, exact_ranks, merge_deltas, module_union, run_merge

NAMES = ["alpha", "beta", "gamma"]
T1 = torch.tensor([[3.0, -1.0, 0.5], [-2.0, 4.0, -0.2]])
T2 = torch.tensor([[-1.5, 2.0, 1.0], [3.0, -0.5, 0.1]])


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: with a second thread on a busy 2-core machine every op waits on
    OpenMP barriers (40 ms per scatter), so the merging tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _adapter(name: str, deltas: dict[str, torch.Tensor]) -> Adapter:
    """An adapter whose update on each module is exactly the given matrix (B = I, A = dW)."""
    return Adapter(name, {k: LoraModule(A=d.clone(), B=torch.eye(d.shape[0]), scale=1.0) for k, d in deltas.items()})


def _ids(n=3, length=10, seed=0):
    return torch.randint(3, 49152, (n, length), generator=torch.Generator().manual_seed(seed))


def _library(tiny_base, adapter_dir):
    result = scan([adapter_dir], tiny_base.model, tiny_base.name)
    assert not result.errors
    return {a.name: a for a in result.adapters}


# ---------------------------------------------------------------------------- methods by hand


def test_ties_trim_elect_disjoint_mean_by_hand():
    # density 0.5 keeps 3 of 6: T1 -> 3, -2, 4 ; T2 -> -1.5, 2, 3
    assert torch.equal(M.trim_top_k(T1, 0.5), torch.tensor([[3.0, 0, 0], [-2.0, 4.0, 0]]))
    assert torch.equal(M.trim_top_k(T2, 0.5), torch.tensor([[-1.5, 2.0, 0], [3.0, 0, 0]]))
    # summed mass [[1.5, 2, 0], [1, 4, 0]] elects + everywhere it is non-zero; disjoint mean of agreeing values
    assert torch.equal(M.METHODS["ties"].fn([T1, T2], [1.0, 1.0], density=0.5), torch.tensor([[3.0, 2, 0], [3, 4, 0]]))
    # weight 0.5 on T2: entry [1,0] now has mass -2 + 1.5 < 0, so -2 wins; entry [0,1] is 1 / |0.5|
    got = M.METHODS["ties"].fn([T1, T2], [1.0, 0.5], density=0.5)
    assert torch.equal(got, torch.tensor([[3.0, 2, 0], [-2, 4, 0]]))


def test_trim_keeps_exactly_the_rounded_count():
    assert [M.n_keep(d, 10) for d in (0.01, 0.1, 0.25, 0.5, 1.0)] == [1, 1, 3, 5, 10]
    x = torch.ones(4, 5)  # all ties: still exactly k survive
    assert int((M.trim_top_k(x, 0.3) != 0).sum()) == 6


def test_dare_fixed_masks_by_hand(monkeypatch):
    m1 = torch.tensor([[True, False, True], [False, True, False]])
    m2 = torch.tensor([[True, True, False], [True, False, True]])
    assert torch.equal(M.dare_drop(T1, m1, 0.5), torch.tensor([[6.0, 0, 1], [0, 8, 0]]))
    masks = iter([m1, m2, m1, m2])
    monkeypatch.setattr(M, "dare_mask", lambda shape, density, generator: next(masks))
    # dropped: T1 -> [[6,0,1],[0,8,0]], T2 -> [[-3,4,0],[6,0,0.2]]
    assert torch.allclose(M.METHODS["dare_linear"].fn([T1, T2], [1.0, 1.0], density=0.5), torch.tensor([[3.0, 4, 1], [6, 8, 0.2]]))
    # TIES on the dropped updates: -3 disagrees with the elected +, everything else has one voter
    assert torch.allclose(M.METHODS["dare_ties"].fn([T1, T2], [1.0, 1.0], density=0.5), torch.tensor([[6.0, 4, 1], [6, 8, 0.2]]))


def test_dare_is_seeded_and_unbiased():
    d = torch.randn(200, 100)
    run = lambda seed: M.METHODS["dare_linear"].fn([d], [1.0], density=0.3, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = (a != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.02
    assert torch.allclose(a[a != 0], d[a != 0] / 0.3)  # survivors rescaled by 1/(1-p)
    mean = torch.stack([run(s) for s in range(40)]).mean(0)  # E[dare(d)] = d
    assert (mean - d).abs().mean() < 0.25 * d.abs().mean()


def test_pcb_by_hand():
    t1, t2 = torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, -1.0]])
    a, b = 1 / (1 + math.e**2), 1 / (1 + math.e)
    # intra (softmax of N * minmax(t*t)): t1 -> [a, 1-a], t2 -> [1-a, a]
    # inter (sum_j softmax(minmax(t_i*t_j))): t1 -> [b,1-b] + [1-b,b] = [1,1]; t2 -> 2 * [1-b, b]
    beta1 = [a, 1 - a]
    beta2 = [(1 - a) * 2 * (1 - b), a * 2 * b]
    assert torch.allclose(M.pcb_scores(torch.cat([t1, t2])), torch.tensor([beta1, beta2]), atol=1e-6)
    want = [(beta1[0] * 1 + beta2[0] * 2) / (beta1[0] + beta2[0]), (beta1[1] * 2 + beta2[1] * -1) / (beta1[1] + beta2[1])]
    assert torch.allclose(M.METHODS["pcb"].fn([t1, t2], [1.0, 1.0], density=1.0), torch.tensor([want]), atol=1e-6)
    # density 0.5 keeps each task's higher-scored entry only: t1's 2 and t2's 2
    assert torch.allclose(M.METHODS["pcb"].fn([t1, t2], [1.0, 1.0], density=0.5), torch.tensor([[2.0, 2.0]]))


def test_pcb_zero_update_does_not_dilute():
    d = torch.randn(4, 6)
    assert torch.allclose(M.METHODS["pcb"].fn([d, torch.zeros(4, 6)], [1.0, 1.0], density=1.0), d, atol=1e-6)


def test_linear_by_hand_with_lambda_and_module_union():
    a = _adapter("a", {"m1": T1, "m2": T2})
    b = _adapter("b", {"m1": T2})  # does not target m2: a zero update there
    out = merge_deltas([a, b], [1.0, 0.5], "linear", {"lambda": 2.0})
    assert sorted(out) == ["m1", "m2"] == module_union([a, b])
    assert torch.allclose(out["m1"], torch.tensor([[4.5, 0, 2], [-1, 7.5, -0.3]]))
    assert torch.allclose(out["m2"], 2 * T2)
    ties = merge_deltas([a, b], [1.0, 1.0], "ties", {"density": 0.5})
    assert torch.equal(ties["m2"], M.trim_top_k(T2, 0.5))  # the missing adapter neither votes nor dilutes


def test_random_methods_draw_per_module_seeds():
    a = _adapter("a", {"x": torch.randn(8, 8), "y": torch.randn(8, 8)})
    r1 = merge_deltas([a], [1.0], "dare_linear", {"density": 0.5, "seed": 3})
    r2 = merge_deltas([a], [1.0], "dare_linear", {"density": 0.5, "seed": 3})
    r3 = merge_deltas([a], [1.0], "dare_linear", {"density": 0.5, "seed": 4})
    assert all(torch.equal(r1[k], r2[k]) for k in r1) and not torch.equal(r1["x"], r3["x"])
    assert not torch.equal(r1["x"] != 0, r1["y"] != 0)  # different modules, different masks


# ---------------------------------------------------------------------------- exactness and export


def _peft_cat(base_model, adapter_dir, weights):
    model = PeftModel.from_pretrained(copy.deepcopy(base_model), adapter_dir / NAMES[0], adapter_name=NAMES[0])
    for n in NAMES[1:]:
        model.load_adapter(adapter_dir / n, adapter_name=n)
    model.add_weighted_adapter(NAMES, weights, "cat", combination_type="cat")
    model.set_adapter("cat")
    return model.eval()


def test_linear_full_rank_equals_peft_cat_and_reloads(tiny_base, adapter_dir, tmp_path):
    weights = [1.0, 0.5, -0.7]
    peft = _peft_cat(tiny_base.model, adapter_dir, weights)
    lib = _library(tiny_base, adapter_dir)
    adapters = [lib[n] for n in NAMES]
    deltas = merge_deltas(adapters, weights, "linear")
    for key, dW in deltas.items():
        layer = peft.base_model.model.get_submodule(key)
        want = layer.scaling["cat"] * layer.lora_B["cat"].weight @ layer.lora_A["cat"].weight
        assert (dW - want).abs().max() < 1e-5, key
    result = MergeResult(deltas, "linear", adapters, weights, {}, exact_ranks(adapters, list(deltas), low_rank=True))
    out = tmp_path / "merged"
    report = export_adapter(result, out, "full", tiny_base, progress=False)
    assert report["output"]["rank"] == 12  # q_proj: alpha (4) + beta (8), the largest summed rank: exact for linear
    assert report["reconstruction"]["overall_relative_error"] < 1e-5
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 12 and set(cfg["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    ids = _ids()
    with torch.no_grad():
        want = peft(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(copy.deepcopy(tiny_base.model), out).eval()
        got_peft = reloaded(input_ids=ids).logits
    assert (got_peft - want).abs().max() < 1e-4
    engine = Engine(tiny_base)
    engine.add_adapter(read_adapter(out, tiny_base.model))
    got_ours = engine.logits(ids, routing=Routing.single(ids.numel(), engine.slot_of("merged")))
    assert (got_ours - want).abs().max() < 1e-4


def test_ties_adapter_reloaded_in_peft_matches_loraswitch(tiny_base, adapter_dir, tmp_path):
    lib = _library(tiny_base, adapter_dir)
    cfg = parse_config({"method": "ties", "adapters": NAMES, "adapter_dirs": [str(adapter_dir)],
                        "parameters": {"density": 0.3}, "output": {"rank": "full"}})
    result = run_merge(cfg, tiny_base, [lib[n] for n in NAMES], progress=False)
    out = tmp_path / "tied"
    report = export_adapter(result, out, cfg.output.rank, tiny_base, progress=False)
    assert report["reconstruction"]["max_relative_error"] < 1e-5  # full dimension: exact
    ids = _ids(seed=1)
    with torch.no_grad():
        want = PeftModel.from_pretrained(copy.deepcopy(tiny_base.model), out).eval()(input_ids=ids).logits
    engine = Engine(tiny_base)
    merged = read_adapter(out, tiny_base.model)
    for key, dW in result.deltas.items():  # the saved factors are the merged dense updates
        assert (merged.modules[key].delta() - dW).abs().max() < 1e-5
    engine.add_adapter(merged)
    got = engine.logits(ids, routing=Routing.single(ids.numel(), engine.slot_of("tied")))
    assert (got - want).abs().max() < 1e-4


def test_svd_error_report_zero_at_full_rank_and_positive_below(tiny_base, adapter_dir, tmp_path):
    lib = _library(tiny_base, adapter_dir)
    adapters = [lib[n] for n in NAMES]
    deltas = merge_deltas(adapters, [1.0, 1.0, 1.0], "linear")
    result = MergeResult(deltas, "linear", adapters, [1.0] * 3, {}, exact_ranks(adapters, list(deltas), low_rank=True))
    low = export_adapter(result, tmp_path / "low", 2, tiny_base, progress=False)["reconstruction"]
    full = export_adapter(result, tmp_path / "full", 64, tiny_base, progress=False)["reconstruction"]
    assert full["max_relative_error"] < 1e-5
    assert low["overall_relative_error"] > 0.05
    # modules with an exact rank above 2 lose something; the report is on disk too
    assert all(m["relative_error"] > 1e-3 for m in low["modules"].values() if m["exact_rank"] > 2)
    on_disk = json.loads((tmp_path / "low" / REPORT_FILE).read_text())
    assert on_disk["reconstruction"]["overall_relative_error"] == pytest.approx(low["overall_relative_error"])
    A, B = svd_factors(torch.ones(3, 2), 5)  # rank above the dimension is zero-padded, exactly
    assert A.shape == (5, 2) and B.shape == (3, 5) and torch.allclose(B @ A, torch.ones(3, 2), atol=1e-6)


def test_full_model_export_equals_dense_mixture(tiny_base, adapter_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    lib = _library(tiny_base, adapter_dir)
    adapters = [lib[n] for n in NAMES]
    weights = [0.7, 0.4, 1.0]
    deltas = merge_deltas(adapters, weights, "linear")
    before = {k: v.clone() for k, v in tiny_base.model.state_dict().items()}
    export_model(MergeResult(deltas, "linear", adapters, weights, {}), tmp_path / "model", tiny_base)
    assert all(torch.equal(before[k], v) for k, v in tiny_base.model.state_dict().items())  # base restored
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    ids = _ids(2, 8, seed=2)
    engine = Engine(tiny_base, [])
    for a in adapters:
        engine.add_adapter(a)
    slots = torch.tensor([engine.slot_of(n) for n in NAMES])
    want = engine.logits(ids, routing=Routing(slots.expand(ids.numel(), -1), torch.tensor(weights).expand(ids.numel(), -1)))
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-4


# ---------------------------------------------------------------------------- YAML


def _write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"method": "average"}, "unknown method 'average' (known: linear, ties, dare_linear, dare_ties, pcb, adamerging)"),
        ({"adapters": ["alpha", "nope"]}, "unknown adapter 'nope'"),
        ({"output": {"rank": 0}}, "output.rank must be an integer from 1 to 1024"),
        ({"output": {"rank": "big"}}, "output.rank must be an integer from 1 to 1024"),
        ({"output": {"rank": 4, "format": "gguf"}}, "output.format must be one of adapter, model"),
        ({"parameters": {"density": 1.5}}, "parameters.density must be in (0.0, 1.0], got 1.5"),
        ({"parameters": {"densty": 0.2}}, "unknown parameter(s) ['densty'] for method 'ties'"),
        ({"adapters": []}, "adapters must be a non-empty list"),
        ({"adapters": [{"name": "alpha", "weight": "heavy"}]}, "adapters[0].weight must be a finite number"),
        ({"outptu": {}}, "unknown key(s) ['outptu']"),
        ({"method": "adamerging", "parameters": {"granularity": "head"}}, "parameters.granularity must be one of task, layer, module"),
    ],
)
def test_yaml_errors_are_clear(tmp_path, adapter_dir, patch, message):
    doc = {"method": "ties", "adapters": ["alpha", "beta"], "adapter_dirs": [str(adapter_dir)], **patch}
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, doc))
    assert message in str(err.value)


def test_yaml_example_parses_with_paths_names_and_defaults(tmp_path, adapter_dir):
    doc = {"method": "dare_ties", "adapters": [{"name": "alpha", "weight": 1.0}, {"name": str(adapter_dir / "gamma"), "weight": 0.5}],
           "adapter_dirs": ["adapters"], "parameters": {"drop_rate": 0.75, "seed": 3}, "output": {"rank": 8}}
    cfg = load_config(_write(tmp_path, doc))  # "adapters" resolves next to the YAML (tmp_path/adapters)
    assert [(a.name, a.weight) for a in cfg.adapters] == [("alpha", 1.0), ("gamma", 0.5)]
    assert cfg.adapters[1].path == adapter_dir / "gamma"
    assert cfg.parameters == {"lambda": 1.0, "seed": 3, "density": 0.25}
    assert (cfg.output.format, cfg.output.rank) == ("adapter", 8)
    with pytest.raises(ConfigError, match="not valid YAML"):
        (tmp_path / "bad.yaml").write_text("method: [ties\n")
        load_config(tmp_path / "bad.yaml")


# ---------------------------------------------------------------------------- AdaMerging

PROMPTS = ["What is 2 + 3?", "Is this review positive or negative? Great phone.", "Reverse: one two", "Sort: 3 1 2"]


@pytest.fixture
def sharp_base(tiny_base):
    """The tiny random model predicts almost uniformly (entropy ~ log V), which leaves entropy
    minimisation nothing to do; scaling the final norm sharpens its predictions like a trained LM."""
    with torch.no_grad():
        tiny_base.model.model.norm.weight.mul_(30)
    return tiny_base


def _ada(tiny_base, adapters, granularity, steps=12, **extra):
    params = {"granularity": granularity, "steps": steps, "lr": 0.05, "batch_size": 4, "gen_tokens": 2,
              "init": 0.3, "prompts": PROMPTS, "seed": 0, **extra}
    return adamerge(tiny_base, adapters, [1.0] * len(adapters), params, progress=False)


def test_adamerging_taskwise_reduces_entropy_and_is_the_engine_mixture(sharp_base, adapter_dir):
    tiny_base = sharp_base
    lib = _library(tiny_base, adapter_dir)
    adapters = [lib[n] for n in NAMES]
    ids = _ids(2, 8, seed=3)
    with torch.no_grad():
        base_logits = tiny_base.model(input_ids=ids).logits
    res = _ada(tiny_base, adapters, "task")
    assert res.entropy_after < res.entropy_before - 0.1
    assert res.coefficients.shape == (1, 3) and res.groups == ["all"]
    assert not torch.allclose(res.coefficients, res.initial)
    assert ((res.coefficients >= 0) & (res.coefficients <= 1)).all()
    # the base model is left unwrapped and unchanged
    assert not any(isinstance(m, MultiLoRALinear) for m in tiny_base.model.modules())
    with torch.no_grad():
        assert torch.equal(tiny_base.model(input_ids=ids).logits, base_logits)
    # the learned coefficients merged by task arithmetic == the engine's dense routing with them
    coefs = res.coefficients[0].tolist()
    merged = _adapter("merged", res.merged_deltas(adapters))
    engine = Engine(tiny_base)
    for a in [*adapters, merged]:
        engine.add_adapter(a)
    slots = torch.tensor([engine.slot_of(n) for n in NAMES])
    mix = engine.logits(ids, routing=Routing(slots.expand(ids.numel(), -1), torch.tensor(coefs).expand(ids.numel(), -1)))
    one = engine.logits(ids, routing=Routing.single(ids.numel(), engine.slot_of("merged")))
    assert (mix - one).abs().max() < 1e-4
    info = res.to_dict()
    assert set(info["coefficients"]["all"]) == set(NAMES) and len(info["entropy_history"]) == 12


def test_adamerging_layerwise_has_coefficients_per_layer(sharp_base, adapter_dir):
    tiny_base = sharp_base
    lib = _library(tiny_base, adapter_dir)
    adapters = [lib["alpha"]]
    # one adapter at weight exactly 1: the kernels' uniform fast path would drop the gradient
    res = _ada(tiny_base, adapters, "layer", steps=8, init=1.0, max_coef=2.0)
    assert res.groups == ["layer 0", "layer 1"] and res.coefficients.shape == (2, 1)
    assert res.entropy_after < res.entropy_before - 0.01
    assert not torch.equal(res.coefficients[0], res.coefficients[1])
    deltas = res.merged_deltas(adapters)
    for key, dW in deltas.items():
        layer = int(key.split(".")[2])
        assert torch.allclose(dW, res.coefficients[layer, 0] * lib["alpha"].modules[key].delta())


# ---------------------------------------------------------------------------- CLI


def test_merge_command_end_to_end(tiny_base, adapter_dir, tmp_path):
    base_dir = tmp_path / "tiny-base"
    tiny_base.model.save_pretrained(base_dir)
    tiny_base.tokenizer.save_pretrained(base_dir)
    app = typer.Typer()
    app.command()(merge_command)
    runner = CliRunner()
    doc = {"method": "pcb", "adapters": [{"name": "alpha", "weight": 1.0}, {"name": "beta", "weight": 0.5}],
           "adapter_dirs": [str(adapter_dir)], "parameters": {"density": 0.3}, "output": {"rank": 6}}
    cfg = _write(tmp_path, doc)
    res = runner.invoke(app, [str(cfg), str(tmp_path / "merged_pcb"), "--base", str(base_dir)])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "merged_pcb" / REPORT_FILE).read_text())
    assert report["method"] == "pcb" and report["output"]["rank"] == 6
    assert 0 < report["reconstruction"]["overall_relative_error"] < 1
    assert read_adapter(tmp_path / "merged_pcb", tiny_base.model).ranks == [6]
    # errors exit 2 with the message, before any model is loaded
    bad = _write(tmp_path, {**doc, "output": {"rank": -3}})
    res = runner.invoke(app, [str(bad), str(tmp_path / "x"), "--base", str(base_dir)])
    assert res.exit_code == 2 and "output.rank must be an integer from 1" in " ".join(res.output.split())


def test_coefficient_router_gives_gradient_at_zero_and_at_one(tiny_base, adapter_dir):
    """The kernels skip weight-0 pairs and take a weight-free path for one adapter at weight 1:
    the router must keep a gradient in both cases, or projected coefficients get stuck."""
    from loraswitch.merging.adamerging import CoefficientRouter

    lib = _library(tiny_base, adapter_dir)
    for names, start in ((["alpha", "beta"], 0.0), (["alpha"], 1.0)):
        base = Base(copy.deepcopy(tiny_base.model), tiny_base.tokenizer, "tiny", "random")  # an unwrapped model each time
        engine = Engine(base)
        for n in names:
            engine.add_adapter(lib[n])
        coef = torch.nn.Parameter(torch.full((1, len(names)), start))
        router = CoefficientRouter(coef, dict.fromkeys(engine.layers, 0), [engine.slot_of(n) for n in names])
        with engine.routed(dynamic=router):
            base.model(input_ids=_ids(2, 6)).logits.pow(2).sum().backward()
        assert coef.grad is not None and coef.grad.abs().min() > 0, (names, start)


def test_adamerging_prompts_come_from_config_file_or_adapter_examples(tiny_base, adapter_dir, tmp_path):
    """AdaMerging never reaches into a task suite: its prompts are the config's, a prompts file's,
    or the adapters' own examples files, in that order; with none it refuses with a clear message."""
    import shutil

    from loraswitch.merging.adamerging import unlabeled_prompts
    from loraswitch.merging.config import ADAMERGING_PARAMS

    adapters = scan([adapter_dir], tiny_base.model).adapters
    params = dict(ADAMERGING_PARAMS)
    with pytest.raises(ValueError, match="needs unlabeled prompts"):
        unlabeled_prompts(tiny_base, adapters, params)
    assert unlabeled_prompts(tiny_base, adapters, {**params, "prompts": ["alpha"]}) == [tiny_base.chat_ids("alpha")]
    listed = tmp_path / "prompts.jsonl"
    listed.write_text('{"prompt": "from the file"}\n\n{"prompt": "second"}\n')
    got = unlabeled_prompts(tiny_base, adapters, {**params, "prompts_file": str(listed)})
    assert got == [tiny_base.chat_ids("from the file"), tiny_base.chat_ids("second")]
    # examples shipped inside an adapter folder: the first n_prompts of each
    folder = tmp_path / "with_examples"
    shutil.copytree(adapters[0].path, folder)
    (folder / "examples.txt").write_text("one\ntwo\nthree\n")
    from loraswitch.library import read_adapter

    shipped = read_adapter(folder, tiny_base.model)
    got = unlabeled_prompts(tiny_base, [shipped, *adapters[1:]], {**params, "n_prompts": 2})
    assert got == [tiny_base.chat_ids("one"), tiny_base.chat_ids("two")]
    with pytest.raises(ConfigError, match="prompts_file"):
        parse_config({"method": "adamerging", "adapters": ["a"], "parameters": {"prompts_file": str(tmp_path / "nope.txt")}})


def test_merge_command_never_loses_a_folder_and_reads_the_configs_it_documents(tiny_base, adapter_dir, tmp_path):
    """The output is checked before any model loads: a file, an input adapter's folder, a folder
    with files (without --force) are refused with exit 2; AdaMerging's `prompts` list is taken
    from the YAML; a key given twice and a non-UTF-8 file are errors; rank is bounded."""
    app = typer.Typer()
    app.command("merge")(merge_command)
    app.command("noop")(lambda: None)
    runner = CliRunner()
    doc = {"method": "linear", "adapters": ["alpha", "beta"], "adapter_dirs": [str(adapter_dir)]}
    cfg = _write(tmp_path, doc)
    (tmp_path / "afile").write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    for out, why in ((tmp_path / "afile", "is not a folder"), (adapter_dir / "alpha", "is an adapter being merged"),
                     (full, "already holds files")):
        res = runner.invoke(app, ["merge", str(cfg), str(out)])
        assert res.exit_code == 2 and why in " ".join(res.output.split()), res.output
    # --force replaces an earlier merge's output only: never a folder holding an input, the config
    # or other files (a review's --force into the library folder deleted every adapter in it)
    beside = tmp_path / "configs"
    beside.mkdir()
    (beside / "merge.yaml").write_text(cfg.read_text())
    for out, config, why in ((adapter_dir, cfg, "holds an adapter being merged"), (beside, beside / "merge.yaml",
                             "holds the merge config"), (full, cfg, "not an earlier merge's output"),
                             (Path.cwd(), cfg, "working directory")):
        res = runner.invoke(app, ["merge", str(config), str(out), "--force"])
        assert res.exit_code == 2 and why in " ".join(res.output.split()), res.output
    assert (full / "keep.txt").read_text() == "mine" and (tmp_path / "afile").read_text() == "x"
    assert (adapter_dir / "alpha" / "adapter_config.json").is_file() and cfg.is_file()
    for bad, why in (({**doc, "output": {"rank": 2000}}, "from 1 to 1024"),
                     ({**doc, "method": "ties", "parameters": {"drop_rate": 0.5}}, "unknown parameter")):
        with pytest.raises(ConfigError, match=why):
            parse_config(bad)
    for weights, why in (((1e30, 1.0), "must be in"), ((0, 0.0), "every adapter's weight is 0")):
        with pytest.raises(ConfigError, match=why):
            parse_config({**doc, "adapters": [{"name": n, "weight": w} for n, w in zip(("alpha", "beta"), weights)]})
    small = yaml.safe_load("adapters: [{name: alpha, weight: 1e-3}, beta]")["adapters"]  # YAML 1.1: a string
    assert parse_config({**doc, "adapters": small}).adapters[0].weight == 1e-3
    ada = parse_config({"method": "adamerging", "adapters": ["alpha", "beta"], "adapter_dirs": [str(adapter_dir)],
                        "parameters": {"prompts": ["one prompt", "another"], "steps": 1}})
    assert ada.parameters["prompts"] == ["one prompt", "another"] and ada.parameters["prompts_file"] is None
    (tmp_path / "prompts.txt").write_text("a prompt\n")
    near = tmp_path / "near.yaml"  # a prompts file beside the YAML, whatever the working directory
    near.write_text(yaml.safe_dump({**doc, "method": "adamerging", "parameters": {"prompts_file": "prompts.txt"}}))
    assert Path(load_config(near).parameters["prompts_file"]) == tmp_path / "prompts.txt"
    twice = tmp_path / "twice.yaml"
    twice.write_text(f"method: ties\nmethod: linear\nadapters: [alpha]\nadapter_dirs: [{adapter_dir}]\n")
    with pytest.raises(ConfigError, match="given twice"):
        load_config(twice)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)


def test_folders_of_the_same_name_are_told_apart_by_the_folders_above_them(adapter_dir, tmp_path):
    """Every training run's output is called alike (runs/a/final, runs/b/final): such folders
    are merged under names that tell them apart ("a-final", "b-final"); one folder given twice
    is an error."""
    import shutil

    for run, src in (("a", "alpha"), ("b", "beta")):
        shutil.copytree(adapter_dir / src, tmp_path / "runs" / run / "final")
    cfg = parse_config({"method": "linear", "adapters": [str(tmp_path / "runs" / r / "final") for r in ("a", "b")]})
    assert [a.name for a in cfg.adapters] == ["a-final", "b-final"]
    assert [a.path for a in cfg.adapters] == [tmp_path / "runs" / r / "final" for r in ("a", "b")]
    deeper = tmp_path / "x" / "a" / "final"  # alike one level up too: named by two folders above
    shutil.copytree(adapter_dir / "alpha", deeper)
    cfg = parse_config({"method": "linear", "adapters": [str(tmp_path / "runs" / "a" / "final"), str(deeper)]})
    assert [a.name for a in cfg.adapters] == ["runs-a-final", "x-a-final"]
    with pytest.raises(ConfigError, match="given twice"):  # the same folder, spelled two ways
        parse_config({"method": "linear", "adapters": [str(deeper), str(deeper / ".." / "final")]})
    with pytest.raises(ConfigError, match="given twice"):
        parse_config({"method": "linear", "adapters": ["alpha", str(adapter_dir / "alpha")],
                      "adapter_dirs": [str(adapter_dir)]})
