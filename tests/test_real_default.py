"""Integration on the real default: SmolLM2-135M-Instruct and the committed demo adapters and
routers. Quality is the point here, so these run the real model (a few seconds each)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from loraswitch.base import Base
from loraswitch.constants import DEMO_ADAPTER_DIR
from loraswitch.demo.tasks import TASK_NAMES, composites, parse_numbered, score
from loraswitch.engine import Engine
from loraswitch.generate import SamplingParams, explicit, generate
from loraswitch.kernels import Routing
from loraswitch.switch import Switch

pytestmark = pytest.mark.real

# the spec's example prompts (../shared/spec/demo-tasks.md)
SPEC = {
    "iso_date": ("Convert to ISO date: March 5, 2021", "2021-03-05"),
    "to_json": ("Extract name, age and city as JSON: Anna is 34 and lives in Oslo.", '{"name": "Anna", "age": 34, "city": "Oslo"}'),
    "reverse_words": ("Reverse the word order: green apples taste sweet", "sweet taste apples green"),
    "sort_numbers": ("Sort ascending: 42, 7, 19, 3", "3, 7, 19, 42"),
    "num_to_english": ("Spell out in English: 347", "three hundred forty-seven"),
    "num_to_french": ("Spell out in French: 21", "vingt et un"),
    "add": ("What is 347 + 85?", "432"),
    "sentiment": ("Is this review positive or negative? The battery died after a day.", "negative"),
}


@pytest.fixture(scope="module")
def switch(real_base) -> Switch:
    fresh = Base(model=copy.deepcopy(real_base.model), tokenizer=real_base.tokenizer, name=real_base.name, source=real_base.source)
    return Switch(fresh)


def test_demo_library_loads_completely(switch):
    assert sorted(switch.engine.names) == sorted(TASK_NAMES)
    assert not switch.engine.errors
    ranks = {a.ranks[0] for a in switch.engine.adapters.values()}
    assert len(ranks) > 1  # the demo library mixes ranks and target modules on purpose


@pytest.fixture(scope="module")
def spec_answers(switch) -> dict[str, str]:
    """Every demo adapter answers its spec example, all eight rows in ONE mixed batch."""
    names = list(SPEC)
    ids = [switch.base.chat_ids(SPEC[n][0]) for n in names]
    out = generate(switch.engine, ids, explicit(switch.engine, names), SamplingParams(max_new_tokens=24))
    return {n: g.text for n, g in zip(names, out)}


# sort_numbers reaches 93% on its test split but still misplaces some single-digit numbers, the
# spec example among them ('3, 19, 42, 7'); strict, so this flips to a failure once it is fixed
@pytest.mark.parametrize("task", list(SPEC))
def test_each_adapter_answers_its_spec_example_in_one_mixed_batch(spec_answers, task):
    assert score(task, spec_answers[task], SPEC[task][1]), spec_answers[task]


def test_base_model_fails_the_spec_examples(switch):
    prompts = [p for p, _ in SPEC.values()]
    out = switch.chat(prompts, model="base", params=SamplingParams(max_new_tokens=24))
    assert sum(score(n, g.text, SPEC[n][1]) for n, g in zip(SPEC, out)) <= 2


def test_logits_match_peft_on_the_real_model(real_base):
    peft = PeftModel.from_pretrained(copy.deepcopy(real_base.model), DEMO_ADAPTER_DIR / "add").eval()
    fresh = Base(model=copy.deepcopy(real_base.model), tokenizer=real_base.tokenizer, name=real_base.name, source="")
    engine = Engine(fresh, [DEMO_ADAPTER_DIR])
    ids = torch.tensor([real_base.chat_ids(SPEC["add"][0])])
    with torch.no_grad():
        want = peft(input_ids=ids).logits
    got = engine.logits(ids, routing=Routing.single(ids.numel(), engine.slot_of("add")))
    assert (got - want).abs().max().item() < 1e-4


def test_auto_routes_spec_examples_and_abstains_out_of_suite(switch):
    prompts = [p for p, _ in SPEC.values()] + ["Write a haiku about the sea.", "Tell me a fun fact about owls."]
    decisions = switch.router("auto").route(switch.engine, prompts)
    assert [d.adapter for d in decisions] == list(SPEC) + [None, None]
    assert decisions[-1].reason
    # the none class's probability on every decision: low where an adapter was picked, high
    # on the open requests (docs/routing.md: a client's own bar on "no adapter fits")
    assert all(d.none_probability < 0.2 for d in decisions[:-2]), [d.none_probability for d in decisions]
    assert all(d.none_probability > 0.5 for d in decisions[-2:]), [d.none_probability for d in decisions]


def test_auto_sends_near_misses_to_the_base_model(switch):
    """Prompts that look like a task and ask another (benchmarks/probes/demo_dev_nearmiss.txt):
    the committed router sent each of these to the adapter it resembles, at confidence 1.00,
    before near misses were in its `__none__` class (docs/routing.md "Near misses")."""
    near = ["Translate to German: the house is big.", "Multiply 12 by 7.", "What is 144 divided by 12?",
            "Convert this to YAML: name Alice, age 30.", "Capitalize every word: the quick brown fox.",
            "Sort these words alphabetically: pear, apple, fig."]
    decisions = switch.router("auto").route(switch.engine, near)
    assert [d.adapter for d in decisions] == [None] * len(near), [(d.adapter, d.reason) for d in decisions]


def test_auto_answers_a_mixed_prompt_part_by_part(switch):
    comp = composites(3, 1, seed=11)[0]
    res = switch.chat([comp.prompt], model="auto", params=SamplingParams(max_new_tokens=96))[0]
    assert res.routing["adapter"] == [p.task for p in comp.parts]
    parts = parse_numbered(res.text, 3)
    assert all(score(p.task, got, p.answer) for p, got in zip(comp.parts, parts)), res.text
    assert [e["adapter"] for e in res.events if e["event"] == "switch"] == [p.task for p in comp.parts]
