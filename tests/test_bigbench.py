"""The BIG-bench suite on a fixture in BIG-bench's file format, written here with made-up examples
(no BIG-bench text is ever committed): fetch / extract / verify, splits, rendering, scoring,
MeteoRA-format composites, and the suite the eval is given. Tests on the real files skip when
`loraswitch data bigbench` has not been run."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from loraswitch.demo.bigbench import composites as comp
from loraswitch.demo.bigbench import fetch, rewording, tasks
from loraswitch.demo.bigbench.metrics import normalize, score

N = 320  # examples per fixture file: enough for test (200) + val (100) + a train split


def _mc(i: int, options: list[str], right: int) -> dict:
    return {"input": f"Made-up question number {i}?", "target_scores": {o: int(k == right) for k, o in enumerate(options)}}


def _fixture_file(rel: str) -> dict:
    """A made-up task file shaped like the real one (multiple choice or generative)."""
    task = rel.split("/")[0]
    if tasks.TASKS[task].choice:
        exs = [_mc(i, [f"option {i} a", f"option {i} b", f"option {i} c"], i % 3) for i in range(N)]
        if task == "strategyqa":
            exs = [{"input": f"Is made-up fact {i} true?", "target_scores": {"Yes": i % 2, "No": 1 - i % 2},
                    "target": ("Yes. " if i % 2 else "No. ") + "Because of made-up reasons."} for i in range(N)]
    else:
        exs = [{"input": f"Count the made-up things in list {i}.", "target": [f"word{i}", str(i)]} for i in range(N)]
    return {"canary": "fixture", "name": task, "task_prefix": "Fixture prefix.\n", "examples": exs}


@pytest.fixture
def sdist(tmp_path):
    """A tar.gz laid out like bigbench-1.0.0.tar.gz, holding only made-up task files."""
    path = tmp_path / fetch.SDIST_NAME
    with tarfile.open(path, "w:gz") as tar:
        for rel in fetch.FILES:
            data = json.dumps(_fixture_file(rel)).encode()
            info = tarfile.TarInfo(fetch.TASKS_PREFIX + rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        extra = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/other_task/task.json")
        tar.addfile(extra, io.BytesIO(b""))
    return path


@pytest.fixture
def root(tmp_path, sdist, monkeypatch):
    counts = dict.fromkeys(fetch.FILES, N)
    monkeypatch.setattr(fetch, "FILES", counts)
    out = tmp_path / "cache" / "bigbench"
    fetch.extract(sdist, out, counts)
    monkeypatch.setattr(fetch, "data_dir", lambda: out)
    tasks.splits.cache_clear()
    tasks._verified.cache_clear()
    rewording._framing.cache_clear()
    yield out
    tasks.splits.cache_clear()
    tasks._verified.cache_clear()
    rewording._framing.cache_clear()


def test_extract_takes_only_the_needed_files_and_verifies(root):
    assert (root / fetch.VERIFIED).is_file()
    assert not (root / "other_task").exists()
    assert sorted(str(p.relative_to(root)) for p in root.rglob("task.json")) == sorted(fetch.FILES)
    assert fetch.verify(root, fetch.FILES) == []
    assert fetch.ensure(root=root) == root  # already there: no download


def test_verify_catches_missing_wrong_count_and_corrupt(root):
    rel = "winowhy/task.json"
    assert fetch.verify(root, {rel: N + 1}) == [f"{root / rel}: {N} examples, expected {N + 1}"]
    (root / rel).write_text("{not json")
    assert "unreadable" in fetch.verify(root, {rel: N})[0]
    (root / rel).unlink()
    assert fetch.verify(root, {rel: N})


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASWITCH_CACHE", str(tmp_path))
    assert fetch.data_dir() == tmp_path / "bigbench"
    with pytest.raises(fetch.BigBenchDataError, match="loraswitch data bigbench"):
        fetch.require()


def test_a_broken_sdist_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a tar")
    with pytest.raises(fetch.BigBenchDataError, match="cannot read"):
        fetch.extract(bad, tmp_path / "out")


def test_splits_are_disjoint_seeded_and_sized(root):
    for task in tasks.TASK_NAMES:
        sp = tasks.splits(task, root)
        n_files = len(tasks.TASKS[task].files)
        assert len(sp["test"]) == tasks.TEST_N and len(sp["val"]) == tasks.VAL_N
        # logical_deduction merges three files (the fixture repeats inputs across them: duplicates drop)
        assert len(sp["train"]) == N - tasks.TEST_N - tasks.VAL_N, (task, n_files)
        prompts = [{e.prompt for e in sp[s]} for s in tasks.SPLITS]
        assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    tasks.splits.cache_clear()
    again = tasks.splits("winowhy", root)
    assert [e.prompt for e in again["test"]] == [e.prompt for e in tasks.splits("winowhy", root)["test"]]
    assert tasks.examples("winowhy", "test", 5, root=root) != tasks.examples("winowhy", "test", 5, seed=1, root=root)


def test_render_multiple_choice_and_generative(root):
    ex = tasks.examples("epistemic_reasoning", "test", 1, root=root)[0]
    lines = ex.prompt.splitlines()
    assert lines[0] == "Fixture prefix." and lines[1].startswith("Made-up question number")
    options = [ln.removeprefix("choice: ") for ln in lines if ln.startswith("choice: ")]
    assert len(options) == 3 and ex.answer in options and ex.targets == (ex.answer,)
    # the option order is shuffled (seeded by the input, so the same input renders the same prompt)
    first = {e.prompt.split("choice: ")[1].split()[-1] for e in tasks.examples("epistemic_reasoning", "train", root=root)}
    assert first == {"a", "b", "c"}
    raw = json.loads((root / "epistemic_reasoning/task.json").read_text())
    assert tasks.render("epistemic_reasoning", raw, raw["examples"][7]) == tasks.render("epistemic_reasoning", raw, raw["examples"][7])
    sqa = tasks.examples("strategyqa", "test", 4, root=root)
    assert {e.answer for e in sqa} <= {"Yes", "No"}  # the Yes/No, not the explanation
    gen = tasks.examples("object_counting", "test", 1, root=root)[0]
    assert "choice:" not in gen.prompt and gen.answer.startswith("word") and len(gen.targets) == 2


def test_over_long_prompts_are_skipped(root):
    data = json.loads((root / "object_counting/task.json").read_text())
    data["examples"][0]["input"] = "x" * (tasks.MAX_PROMPT_CHARS + 1)
    (root / "object_counting/task.json").write_text(json.dumps(data))
    exs, dupes, too_long = tasks.rendered("object_counting", root)
    assert too_long == 1 and dupes == 0 and len(exs) == N - 1


def test_metric_generative_form():
    assert normalize("  choice: The Blue Book is the leftmost.\nmore text") == "the blue book is the leftmost"
    assert score("Yes.", ("Yes",)) and not score("No", ("Yes",))
    assert score("3", ("three", "3")) and score('"Three"', ("three", "3"))
    assert not score("", ("",)) and not score("three apples", ("three",))


def test_meteora_composites(root):
    prompts = comp.composite_parts(3, 2)
    assert len(prompts) == 2
    prompt, parts = prompts[0]
    assert [p.task for p in parts] == list(comp.COMPOSITE_SETS[3])
    assert prompt.count("[INST]") == 3 * 3 and prompt.count("[/INST]") == 9  # two worked examples + the questions
    assert prompt.startswith(comp.INSTRUCTION) and comp.FOLLOW_UP in prompt
    questions = prompt.split(comp.FOLLOW_UP)[1]
    assert all(f"[INST] {p.prompt} [/INST]" in questions for p in parts)
    test_prompts = {e.prompt for t in comp.COMPOSITE_SETS[3] for e in tasks.splits(t)["test"]}
    worked = prompt.split(comp.FOLLOW_UP)[0]
    assert not any(p in worked for p in test_prompts)  # worked examples come from train
    assert len(comp.COMPOSITE_SETS[10]) == 10 and set(comp.COMPOSITE_SETS[10]) == set(tasks.TASK_NAMES)
    with pytest.raises(ValueError):
        comp.composite_parts(4, 1)


def test_bigbench_suite_for_the_eval(root):
    from loraswitch.demo.suites import BigBenchSuite, suite_for
    from loraswitch.eval.data import build_items

    suite = suite_for("bigbench")
    assert isinstance(suite, BigBenchSuite) and suite.composite_sizes == (3, 5, 10)
    items = build_items(suite, list(suite.task_names), limit=2, composite_limit=1, oos_limit=1)
    sets = [i.set for i in items]
    assert sets.count("task") == 20 and sets.count("composite-10") == 1 and sets.count("oos") == 1
    c5 = next(i for i in items if i.set == "composite-5")
    assert suite.parse_parts(c5.answer, 5) == [p.answer for p in c5.parts]
    assert all(suite.score(p, p.answer) for p in c5.parts)
    counting = next(i for i in items if i.task == "object_counting")
    assert suite.score(counting.case, counting.targets[1])  # any listed target scores
    # a task subset that cannot form MeteoRA's set gets no composite of that size
    assert not [i for i in build_items(suite, ["winowhy", "disfl_qa", "strategyqa"], 1) if i.parts]
    with pytest.raises(ValueError):
        suite_for("nope")


def test_real_data_shapes():
    """On the real files (after `loraswitch data bigbench`): counts, and strategyqa's Yes/No."""
    if fetch.verify():
        pytest.skip("BIG-bench data not fetched (run `loraswitch data bigbench`); the fixture tests cover the code")
    tasks.splits.cache_clear()
    for task in tasks.TASK_NAMES:
        sp = tasks.splits(task)
        assert len(sp["test"]) == tasks.TEST_N and len(sp["train"]) >= 600, task
    assert {e.answer for e in tasks.examples("strategyqa", "train")} == {"Yes", "No"}


def test_router_data_folder_from_train_splits(root, tmp_path):
    from loraswitch.demo.router_data import write_bigbench_router_data
    from loraswitch.routing.data import read_folder

    paths = write_bigbench_router_data(tmp_path / "rd", per_task=20)
    assert sorted(p.stem for p in paths) == sorted(tasks.TASK_NAMES)
    train, val = read_folder(tmp_path / "rd")
    for task in tasks.TASK_NAMES:
        rows = train.get(task, []) + val.get(task, [])
        train_split = {e.prompt: e for e in tasks.splits(task)["train"]}
        original = [(p, a) for p, a in rows if p in train_split]
        reworded = [(p, a) for p, a in rows if p not in train_split]
        # each training example as BIG-bench renders it, and most once reworded with the same
        # answer; a validation prompt is never one of a reworded pair (no twin on the other side)
        assert len(original) == 20 and 12 <= len(reworded) < 20
        assert {a for _, a in reworded} <= {e.answer for e in train_split.values()}
        assert all(p in train_split for p, _ in val.get(task, []))


def test_rewording_keeps_the_question_and_options_in_another_layout(root):
    from loraswitch.demo.bigbench.rewording import reword

    exs = tasks.examples("epistemic_reasoning", "train", 40, root=root)
    again = [reword(e) for e in exs]
    assert [r.prompt for r in again] == [reword(e).prompt for e in exs]  # the same every time
    assert len({r.prompt.split("Made-up")[0] for r in again}) > 3  # several framings and layouts
    for e, r in zip(exs, again):
        assert (r.task, r.answer, r.targets) == (e.task, e.answer, e.targets)
        question = e.prompt.split("\n")[1]
        options = [line[len("choice: "):] for line in e.prompt.split("\n") if line.startswith("choice: ")]
        assert question in r.prompt and all(o in r.prompt for o in options)
        assert not any(line[:1].isdigit() for line in r.prompt.split("\n"))  # never read as a numbered list
    assert any("choice: " not in r.prompt for r in again) and any("Fixture prefix." not in r.prompt for r in again)


def test_heldout_tasks_come_from_the_same_sdist_into_their_own_folder(tmp_path, monkeypatch):
    """The segmentation benchmark's held-out single-task prompts: ten other BIG-bench tasks,
    extracted and verified in `heldout/` (the library's verified files untouched), rendered
    like the library's (options as `choice:` lines where the task has target_scores)."""
    path = tmp_path / fetch.SDIST_NAME
    counts = dict.fromkeys(fetch.HELDOUT_FILES, 30)
    with tarfile.open(path, "w:gz") as tar:
        for k, rel in enumerate(fetch.HELDOUT_FILES):
            exs = ([_mc(i, ["yes", "no"], i % 2) for i in range(30)] if k % 2 else
                   [{"input": f"Sort made-up words {i}.", "target": f"a{i} b{i}"} for i in range(30)])
            data = json.dumps({"name": rel, "examples": exs}).encode()
            info = tarfile.TarInfo(fetch.TASKS_PREFIX + rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(fetch, "HELDOUT_FILES", counts)
    monkeypatch.setattr(tasks, "HELDOUT_FILES", counts)
    monkeypatch.setattr(tasks, "heldout_dir", lambda: tmp_path / "cache" / "heldout")
    exs = tasks.heldout_examples(4, path)
    assert len(exs) == 4 * len(counts) and len({e.task for e in exs}) == len(counts)
    assert not fetch.verify(tmp_path / "cache" / "heldout", counts)
    mc = [e for e in exs if "choice: yes" in e.prompt]
    assert mc and all(e.answer in ("yes", "no") for e in mc)
    assert tasks.heldout_examples(4, path) == exs  # seeded: the same prompts every time
