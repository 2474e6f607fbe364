"""The adapter trainer (loraswitch.demo.zoo): validation checks keep the best weights, the check
measures exactly what greedy decoding would answer, NaN losses never reach the weights, saved
adapters name their base as the library knows it, and the base model goes where it is told."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from loraswitch.base import BaseModelError, load_base
from loraswitch.demo.zoo.build import stamp_base
from loraswitch.demo.zoo.train import Recipe, answer_exact_rate, train_adapter
from loraswitch.padding import left_pad

PAIRS = [(f"Say the word number {i}.", ["apple", "pear", "plum"][i % 3]) for i in range(24)]


def _recipe(**kw) -> Recipe:
    return Recipe(**{"rank": 2, "alpha": 4, "steps": 6, "batch_size": 4, "lr": 5e-3, "warmup": 1,
                     "target_modules": ["q_proj", "v_proj"], **kw})


def _greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            batch = left_pad([out], 0).model_inputs()
            out.append(int(model(**batch).logits[0, -1].argmax()))
    return out[len(ids):]


def test_answer_exact_rate_is_greedy_decoding_word_for_word(tiny_base):
    """A row whose answer is the model's own greedy continuation scores 1; change one answer
    token and it scores 0: the trainer's validation check is greedy exact match, without generating."""
    model = tiny_base.model
    prompts = [[5, 17, 300, 42], [9, 8, 7], [1000, 2000, 3000, 4000, 5000]]
    rows = [(p + _greedy(model, p, 3), 3) for p in prompts]
    assert answer_exact_rate(model, rows, pad_id=2) == 1.0
    broken = [(ids[:-1] + [(ids[-1] + 1) % 49152], n) for ids, n in rows[:2]] + rows[2:]
    assert answer_exact_rate(model, broken, pad_id=2) == pytest.approx(1 / 3)


def test_validation_checks_keep_the_best_step(tiny_base, tmp_path):
    stats = train_adapter(tiny_base, PAIRS, _recipe(checks=3), tmp_path / "a", progress=False, val_pairs=PAIRS[:8])
    steps = [c["step"] for c in stats["val_checks"]]
    assert steps == [2, 4, 6]
    best = max(c["val_exact"] for c in stats["val_checks"])
    assert stats["kept_step"] == max(c["step"] for c in stats["val_checks"] if c["val_exact"] == best)
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    # the base model is given back unwrapped: no PEFT layers left behind for the next task
    assert not any("lora_" in n for n, _ in tiny_base.model.named_parameters())


def test_no_checks_without_validation_pairs(tiny_base, tmp_path):
    stats = train_adapter(tiny_base, PAIRS, _recipe(checks=3), tmp_path / "a", progress=False)
    assert "val_checks" not in stats and stats["nonfinite_steps_skipped"] == 0


def test_nan_losses_are_skipped_not_learned(tiny_base, tmp_path):
    """A base that yields NaN logits: every step is skipped and the saved adapter stays finite
    (a step on a NaN loss would have written NaN into every LoRA weight)."""
    poisoned = copy.copy(tiny_base)
    poisoned.model = copy.deepcopy(tiny_base.model)
    with torch.no_grad():
        poisoned.model.model.norm.weight.fill_(float("nan"))
    stats = train_adapter(poisoned, PAIRS, _recipe(), tmp_path / "a", progress=False)
    assert stats["nonfinite_steps_skipped"] == 6
    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


def test_stamp_base_names_the_library_base(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": "/tmp/site/x"}))
    (tmp_path / "README.md").write_text("---\nbase_model: /tmp/site/x\n---\n")
    stamp_base(tmp_path, "HuggingFaceTB/SmolLM2-135M-Instruct")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg == {"r": 8, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    assert "/tmp/site" not in (tmp_path / "README.md").read_text()


def test_load_base_device(tmp_path, tiny_base, monkeypatch):
    tiny_base.model.save_pretrained(tmp_path / "m")
    tiny_base.tokenizer.save_pretrained(tmp_path / "m")
    assert next(load_base(tmp_path / "m", device="cpu").model.parameters()).device.type == "cpu"
    monkeypatch.setenv("LORASWITCH_DEVICE", "no-such-device")
    with pytest.raises(BaseModelError, match="no-such-device"):
        load_base(tmp_path / "m")


def test_zoo_eval_reports_each_task_as_it_finishes():
    """`evaluate_zoo` hands each task's result over as soon as it is measured (the command writes
    it into the manifest then), scoring adapter and base on the same test prompts."""
    from types import SimpleNamespace

    from loraswitch.demo.suites import DemoSuite
    from loraswitch.demo.zoo.evaluate import evaluate_zoo

    suite = DemoSuite()
    answers = {c.prompt: c.answer for t in ("add", "iso_date") for c in suite.examples(t, "test", 4)}

    class Oracle:  # the adapter answers right, the base model answers nothing
        def chat(self, prompts, model, params):
            return [SimpleNamespace(text=answers[p] if model != "base" else "") for p in prompts]

    seen = []
    results = evaluate_zoo(Oracle(), suite, ["add", "iso_date"], n=4, progress=False,
                           on_task=lambda t, r: seen.append((t, r["adapter_accuracy"], r["base_accuracy"])))
    assert seen == [("add", 1.0, 0.0), ("iso_date", 1.0, 0.0)]
    assert all(r["meets_bar"] and r["n_test"] == 4 for r in results.values())
