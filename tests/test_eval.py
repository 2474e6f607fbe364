"""The evaluation harness on a tiny random model with random adapters named after demo tasks:
end to end (every method family, every output file), and scoring / aggregation on hand-made
answers."""

from __future__ import annotations

import json

import pytest

from loraswitch.base import Base
from loraswitch.demo.suites import DemoSuite
from loraswitch.eval import EvalConfig, build_items, run_eval
from loraswitch.eval.data import Item
from loraswitch.eval.report import _targets_table
from loraswitch.eval.scoring import aggregate, chosen_adapter, part_adapters, routing_targets, score_item
from loraswitch.eval.suite import Case
from loraswitch.generate import Generation
from tests.conftest import tiny_model, write_adapter


def Answer(text: str, n_tokens: int, trace: list | None = None, routing: dict | None = None) -> Generation:
    """A hand-made answer: `n_tokens` generated tokens (ids do not matter to scoring)."""
    return Generation([], [0] * n_tokens, text, "stop", list(trace or []), routing=dict(routing or {}))

TASKS = ["iso_date", "add", "sentiment"]
SUITE = DemoSuite()


@pytest.fixture
def task_adapters(tmp_path, tiny_base):
    root = tmp_path / "adapters"
    write_adapter(tiny_base.model, root / "iso_date", r=4, targets=("q_proj", "v_proj"), seed=1)
    write_adapter(tiny_base.model, root / "add", r=8, alpha=4, targets=("q_proj", "k_proj", "o_proj", "down_proj"), seed=2)
    write_adapter(tiny_base.model, root / "sentiment", r=2, alpha=16, targets=("gate_proj", "up_proj", "v_proj"), seed=3)
    return root


@pytest.fixture
def routers(tmp_path, tiny_base, task_adapters):
    """A sequence router and gates trained for seconds on the tiny model (quality irrelevant)."""
    from loraswitch.demo.router_data import demo_pairs
    from loraswitch.engine import Engine
    from loraswitch.routing.data import prompts_only
    from loraswitch.routing.gate import train_gates
    from loraswitch.routing.seq import train_selector

    base = Base(tiny_model(), tiny_base.tokenizer, "tiny-llama", "random")
    engine = Engine(base, [task_adapters])
    train = {k: v for k, v in demo_pairs("train", 6).items() if k in TASKS or k == "__none__"}
    val = {k: v for k, v in demo_pairs("val", 3).items() if k in TASKS or k == "__none__"}
    out = tmp_path / "routers"
    train_selector(engine, prompts_only(train), prompts_only(val), steps=20, progress=False).save(out)
    train_gates(engine, {k: v[:2] for k, v in train.items()}, epochs=1, lm_steps=1, progress=False).save(out)
    return out


def test_harness_end_to_end(tmp_path, tiny_base, task_adapters, routers):
    def factory():
        return Base(tiny_model(), tiny_base.tokenizer, "tiny-llama", "random")

    methods = ["base", "oracle", "auto", "seq", "arrow", "gate", "gate_meteora", "merge_linear", "merge_ties",
               "peft_linear", "peft_ties", "peft_dare_ties", "peft_cat", "peft_arrow", "peft_xlora"]
    cfg = EvalConfig(suite=SUITE, methods=methods, tasks=TASKS, limit=1, composite_sizes=(2, 3), oos_limit=2, xlora_limit=1,
                     max_new_tokens=3, part_tokens=3, out_dir=tmp_path / "out", adapter_dirs=[task_adapters],
                     router_dir=routers, progress=False, xlora_train_per_adapter=2, xlora_epochs=1)
    results = run_eval(cfg, base_factory=factory)
    out = tmp_path / "out"
    for name in ["results.json", "records.json", "results.md", "accuracy_by_task.png", "routing_confusion.png"]:
        assert (out / name).is_file(), name
    assert list(out.glob("routing_heatmap_*.png"))
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["methods"]) == set(methods)
    bad = {m: r.get("error") for m, r in saved["methods"].items() if r["status"] != "ok"}
    assert not bad, bad
    # the report reads the tasks the run resolved: a run that named none (all of the suite's) too
    from loraswitch.eval.report import markdown

    unnamed = {**saved, "meta": {**saved["meta"], "config": {**saved["meta"]["config"], "tasks": None}}}
    assert markdown(unnamed) == markdown(saved)
    for m, r in results["methods"].items():
        # one test prompt per task (limit=1; X-LoRA's cap of xlora_limit=1 per task keeps all three)
        assert r["accuracy"]["n"] == len(TASKS), m
        assert set(r["accuracy"]["per_task"]) == set(TASKS), m
        assert set(r["composite"]) == {"composite-2", "composite-3"}, m
        assert r["wall_s"] >= 0
    for m in ["auto", "seq", "arrow", "gate", "gate_meteora"]:
        r = results["methods"][m]
        assert r["routes"] and r["n_oos"] == 2
        assert 0 <= r["abstain_rate"] <= 1 and r["routing_accuracy"]["overall"] is not None
        assert sum(sum(row.values()) for row in r["confusion"].values()) == len(TASKS) + 2
    assert "abstain_rate" not in results["methods"]["base"]
    assert results["methods"]["oracle"]["n_items"] == len(TASKS) + 2  # no out-of-suite prompts
    md = (out / "results.md").read_text()
    assert "| `oracle` |" in md and "## Composite prompts" in md
    assert set(results["routing_targets"]) == {"auto", "seq", "arrow", "gate", "gate_meteora", "peft_xlora"} and "## Routing targets" in md


def test_routing_targets_compare_with_the_oracle():
    """Each router's bar: measured against the oracle where a ratio is asked for; unmeasured is None."""
    def method(per_task, routing, heldout, abstain, comp3, routes=True):
        return {"status": "ok", "routes": routes, "accuracy": {"per_task": per_task},
                "routing_accuracy": {"overall": routing, "heldout_wording": heldout}, "abstain_rate": abstain,
                "composite": {"composite-3": {"part_accuracy": comp3}}}

    oracle = method({"add": 1.0, "iso_date": 0.8}, None, None, None, 0.9, routes=False)
    good = method({"add": 1.0, "iso_date": 0.78}, 0.99, 0.95, 0.92, 0.85)
    bad = method({"add": 0.5, "iso_date": 0.8}, 0.97, 0.80, 0.50, 0.5)
    t = routing_targets({"oracle": oracle, "good": good, "bad": bad})
    assert set(t) == {"good", "bad"}
    assert t["good"]["min_task_accuracy_vs_oracle"]["value"] == pytest.approx(0.975)
    unmeasured = {"composite-5_vs_oracle", "composite-10_vs_oracle", "freeform-train_vs_oracle",
                  "freeform-heldout_vs_oracle"}
    assert all(v["met"] for k, v in t["good"].items() if k not in unmeasured)
    assert t["good"]["composite-3_vs_oracle"]["value"] == pytest.approx(0.85 / 0.9, abs=1e-4)
    assert t["good"]["composite-5_vs_oracle"] == {"value": None, "goal": 0.9, "met": None}
    assert not any(v["met"] for k, v in t["bad"].items() if k not in unmeasured)
    table = "\n".join(_targets_table({"routing_targets": t}))
    assert "composite-3 per-part accuracy" in table.split("Not asked")[0]  # measured: a row
    assert "composite-5 per-part accuracy" not in table.split("Not asked")[0]  # asked by nobody: named below
    assert "composite-5 per-part accuracy" in table.split("Not asked")[1]


def test_unavailable_method_is_reported_not_fatal(tmp_path, tiny_base, task_adapters):
    def factory():
        return Base(tiny_model(), tiny_base.tokenizer, "tiny-llama", "random")

    cfg = EvalConfig(suite=SUITE, methods=["base", "seq"], tasks=["add"], limit=1, composite_sizes=(), oos_limit=0,
                     max_new_tokens=2, out_dir=tmp_path / "out", adapter_dirs=[task_adapters],
                     router_dir=tmp_path / "no_routers", progress=False)
    results = run_eval(cfg, base_factory=factory)
    assert results["methods"]["base"]["status"] == "ok"
    assert results["methods"]["seq"]["status"] == "unavailable"
    assert "seq_router" in results["methods"]["seq"]["error"]
    assert "Not evaluated" in (tmp_path / "out" / "results.md").read_text()


def test_resume_reuses_finished_methods_on_the_same_prompts(tmp_path, tiny_base, task_adapters):
    """An interrupted long run is picked up: methods already in --out (same prompts) are not run
    again, new ones are; a different prompt set reruns everything."""
    calls = []

    def factory():
        calls.append(1)
        return Base(tiny_model(), tiny_base.tokenizer, "tiny-llama", "random")

    def cfg(methods, limit=1, resume=True, max_new_tokens=2):
        return EvalConfig(suite=SUITE, methods=methods, tasks=["add"], limit=limit, composite_sizes=(), oos_limit=0,
                          max_new_tokens=max_new_tokens, out_dir=tmp_path / "out", adapter_dirs=[task_adapters],
                          progress=False, resume=resume)

    first = run_eval(cfg(["base"], resume=False), base_factory=factory)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["methods"]["base"]["status"] == "ok"
    n_loads = len(calls)
    again = run_eval(cfg(["base"]), base_factory=factory)
    assert len(calls) == n_loads  # nothing ran: the model was never loaded
    assert again["methods"]["base"]["accuracy"] == first["methods"]["base"]["accuracy"]
    assert again["meta"]["started"] == first["meta"]["started"] and "resumed" in again["meta"]  # dated by the run
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    kept = [{"id": "kept", "prompt": "p", "output": "o", "trace": [{"adapters": {"add": 1.0}}], "parts": []}]
    saved["heatmaps"] = {"base": kept}  # saved records keep no traces: a reused method's
    (tmp_path / "out" / "results.json").write_text(json.dumps(saved))  # heatmap comes from the results
    both = run_eval(cfg(["base", "oracle"]), base_factory=factory)
    assert len(calls) > n_loads and set(both["methods"]) == {"base", "oracle"}
    assert both["methods"]["base"]["wall_s"] == first["methods"]["base"]["wall_s"]  # reused, not rerun
    assert both["heatmaps"]["base"] == kept
    other = run_eval(cfg(["base"], limit=2), base_factory=factory)  # other prompts: rerun
    assert other["methods"]["base"]["accuracy"]["n"] == 2 and "base" not in other["heatmaps"]
    assert "resumed" not in other["meta"]
    n_loads = len(calls)
    with pytest.warns(UserWarning, match="max_new_tokens changed"):  # same prompts, other settings: rerun
        longer = run_eval(cfg(["base"], limit=2, max_new_tokens=3), base_factory=factory)
    assert len(calls) > n_loads and "resumed" not in longer["meta"]
    adapter = next(p for p in task_adapters.rglob("adapter_model.safetensors"))
    adapter.write_bytes(adapter.read_bytes())  # the same bytes: still the same adapters, reused
    assert "resumed" in run_eval(cfg(["base"], limit=2, max_new_tokens=3), base_factory=factory)["meta"]
    config = next(p for p in task_adapters.rglob("adapter_config.json"))
    config.write_text(config.read_text().replace("{", '{"_edited": 1, ', 1))  # other files: rerun
    with pytest.warns(UserWarning, match="adapter / router files"):
        run_eval(cfg(["base"], limit=2, max_new_tokens=3), base_factory=factory)


# ---------------------------------------------------------------------------- scoring by hand
def _ex(task, answer, heldout=False, seen=False):
    return Case(task, f"prompt for {task}", answer, (answer,), heldout, seen)


def test_chosen_adapter_majority_and_abstain():
    trace = [{"adapters": {"add": 0.9, "iso_date": 0.1}}, {"adapters": {"iso_date": 0.7, "add": 0.3}},
             {"adapters": {"add": 1.0}}, {"adapters": {}}]
    assert chosen_adapter(Answer("x", 4, trace)) == "add"
    assert chosen_adapter(Answer("x", 2, [{"adapters": {}}, {"adapters": {}}])) == "base"
    assert chosen_adapter(Answer("x", 0, [], {"adapter": "sentiment"})) == "sentiment"
    assert chosen_adapter(Answer("x", 0, [], {"adapter": None})) == "base"
    # a tie goes to the adapter seen first
    assert chosen_adapter(Answer("x", 2, [{"adapters": {"b": 1}}, {"adapters": {"a": 1}}])) == "b"


def test_part_adapters_from_part_labels_and_from_lines():
    labelled = [{"adapters": {"add": 1.0}, "part": 1}, {"adapters": {"add": 1.0}, "part": 1},
                {"adapters": {"iso_date": 1.0}, "part": 2}]
    assert part_adapters(Answer("", 3, labelled), 2) == ["add", "iso_date"]
    by_line = [{"token": "1", "adapters": {"add": 0.8}}, {"token": ". 42\n", "adapters": {"add": 0.6}},
               {"token": "2", "adapters": {}}, {"token": ".", "adapters": {"sentiment": 0.9}},
               {"token": " positive", "adapters": {"sentiment": 0.9}}]
    assert part_adapters(Answer("", 5, by_line), 2) == ["add", "sentiment"]
    # a part the answer never reached falls back to the routing summary
    assert part_adapters(Answer("", 0, [], {"adapter": ["add", None, "iso_date"]}), 3) == ["add", "base", "iso_date"]


def test_score_and_aggregate_by_hand():
    items = [
        Item("add/0", "task", "What is 1 + 2?", 8, "add", "3", heldout_template=False, seen_payload=False),
        Item("add/1", "task", "Add 2 and 2.", 8, "add", "4", heldout_template=True, seen_payload=False),
        Item("fr/0", "task", "Spell out in French: 21", 8, "num_to_french", "vingt et un", heldout_template=True, seen_payload=False),
        Item("fr/1", "task", "In French words, 3 is?", 8, "num_to_french", "trois", heldout_template=True, seen_payload=True),
        Item("composite-2/0", "composite-2", "...", 40, answer="1. 3\n2. positive",
             parts=[_ex("add", "3"), _ex("sentiment", "positive")]),
        Item("oos/0", "oos", "Write a haiku about tea.", 8),
        Item("oos/1", "oos", "Write a poem about owls.", 8),
    ]

    def a(text, adapter):
        return Answer(text, 2, [{"token": text, "adapters": {adapter: 1.0} if adapter else {}}])

    answers = [
        a("3.", "add"),  # correct (trailing period stripped), routed right
        a("5", "iso_date"),  # wrong answer, misrouted
        a(" vingt et un ", "num_to_french"),  # correct, unseen number
        a("three", None),  # wrong, abstained (false abstain)
        Answer("1. 3\n2. negative", 6, [{"token": "1. 3\n", "adapters": {"add": 1.0}},
                                        {"token": "2. negative", "adapters": {"add": 1.0}}]),
        a("Tea leaves...", None),  # abstained: good
        a("Owls...", "sentiment"),  # answered out-of-suite with an adapter
    ]
    records = [score_item(i, ans, routes=True, suite=SUITE) for i, ans in zip(items, answers)]
    assert [r.get("correct") for r in records[:4]] == [True, False, True, False]
    assert [p["correct"] for p in records[4]["parts"]] == [True, False]
    assert [p["chosen"] for p in records[4]["parts"]] == ["add", "add"]
    agg = aggregate(records, ["add", "num_to_french"], routes=True)
    assert agg["accuracy"]["overall"] == 0.5 and agg["accuracy"]["n"] == 4
    assert agg["accuracy"]["per_task"] == {"add": 0.5, "num_to_french": 0.5}
    assert agg["accuracy_heldout_wording"] == round(1 / 3, 4)
    assert agg["accuracy_training_wording"] == 1.0
    assert agg["num_to_french"] == {"unseen_numbers": 1.0, "seen_numbers_new_wording": 0.0, "n_unseen": 1}
    assert agg["routing_accuracy"]["overall"] == 0.5
    assert agg["routing_accuracy"]["per_task"] == {"add": 0.5, "num_to_french": 0.5}
    assert agg["abstain_rate"] == 0.5 and agg["n_oos"] == 2
    assert agg["false_abstain_rate"] == 0.25
    c2 = agg["composite"]["composite-2"]
    assert c2 == {"n_prompts": 1, "part_accuracy": 0.5, "all_parts_accuracy": 0.0, "part_routing_accuracy": 0.5}
    assert agg["confusion"]["add"] == {"add": 1, "iso_date": 1}
    assert agg["confusion"]["num_to_french"] == {"num_to_french": 1, "base": 1}
    assert agg["confusion"]["out-of-suite"] == {"base": 1, "sentiment": 1}
    plain = aggregate([score_item(i, ans, routes=False, suite=SUITE) for i, ans in zip(items[:5], answers[:5])], ["add"], routes=False)
    assert "routing_accuracy" not in plain and "part_routing_accuracy" not in plain["composite"]["composite-2"]


def test_build_items_respects_task_subset_and_limits():
    items = build_items(SUITE, ["add", "sentiment", "iso_date"], limit=2, composite_sizes=(2, 3, 5), oos_limit=3)
    sets = [i.set for i in items]
    assert sets.count("task") == 6 and sets.count("composite-2") == 2 and sets.count("composite-3") == 2
    assert "composite-5" not in sets  # needs five tasks
    assert sets.count("oos") == 3
    for it in items:
        for p in it.parts:
            assert p.task in {"add", "sentiment", "iso_date"}
        if it.parts:
            assert len({p.task for p in it.parts}) == len(it.parts)
    with pytest.raises(ValueError, match="unknown task"):
        build_items(SUITE, ["nope"], 1)


def test_a_library_whose_adapters_match_no_suite_task_is_refused(tmp_path, adapter_dir):
    from loraswitch.eval.harness import _check_adapters_match

    _check_adapters_match([adapter_dir], ["alpha", "other"], "demo")  # one match: scored
    with pytest.raises(ValueError, match="match none of the demo suite's tasks"):
        _check_adapters_match([adapter_dir], ["iso_date", "add"], "demo")
