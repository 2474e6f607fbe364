"""The demo task suite: exact answers, disjoint splits, held-out wording, composites."""

from __future__ import annotations

import json

import pytest

from loraswitch.demo.tasks import TASK_NAMES, TASKS, composites, examples, out_of_suite, parse_numbered, score
from loraswitch.demo.tasks.spelling import english, french


@pytest.mark.parametrize(
    "n,words",
    [(0, "zero"), (13, "thirteen"), (40, "forty"), (347, "three hundred forty-seven"), (900, "nine hundred"), (999, "nine hundred ninety-nine")],
)
def test_english(n, words):
    assert english(n) == words


@pytest.mark.parametrize(
    "n,words",
    [(0, "zéro"), (17, "dix-sept"), (21, "vingt et un"), (22, "vingt-deux"), (71, "soixante et onze"), (72, "soixante-douze"),
     (80, "quatre-vingts"), (81, "quatre-vingt-un"), (91, "quatre-vingt-onze"), (99, "quatre-vingt-dix-neuf")],
)
def test_french(n, words):
    assert french(n) == words


def test_spec_examples_are_generated_answers():
    assert TASKS["to_json"].score('{"name": "Anna", "age": 34, "city": "Oslo"}', '{"city": "Oslo", "name": "Anna", "age": 34}')
    assert score("iso_date", " 2021-03-05. ", "2021-03-05")
    assert not score("add", "The answer is 432", "432")
    assert not score("to_json", "not json", "{}")


@pytest.mark.parametrize("task", TASK_NAMES)
def test_splits_are_disjoint_and_deterministic(task):
    train = examples(task, "train", 400)
    test = examples(task, "test", 100)
    val = examples(task, "val", 50)
    assert examples(task, "test", 100) == test
    train_prompts = {e.prompt for e in train}
    assert not train_prompts & {e.prompt for e in test}
    assert not {e.payload for e in train} & {e.payload for e in val}
    unseen = [e for e in test if not e.seen_payload]
    assert unseen and not {e.payload for e in train} & {e.payload for e in unseen}
    assert all(e.seen_payload is False or e.heldout_template for e in test)  # seen inputs only in new wording
    assert not any(e.heldout_template for e in train)
    assert any(e.heldout_template for e in test)
    assert all(TASKS[task].score(e.answer, e.answer) for e in test)


def test_composites_draw_distinct_tasks_and_parse():
    for comp in composites(3, 10):
        assert len({p.task for p in comp.parts}) == 3
        assert parse_numbered(comp.answer, 3) == [p.answer for p in comp.parts]
    assert parse_numbered("1. a\n3. c", 3) == ["a", "", "c"]


def test_out_of_suite_splits():
    test = out_of_suite("test", 40)
    assert len(test) == 40 and not set(test) & set(out_of_suite("train", 400))
    assert json.loads(json.dumps(test)) == test  # plain strings, round-trip as JSON
    assert all(isinstance(p, str) and p.strip() for p in test)
