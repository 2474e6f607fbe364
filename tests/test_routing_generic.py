"""The bundled `__none__` prompts (open requests and near misses) and the selector's calibration
rules that keep its abstain threshold meaningful (docs/routing.md "Near misses")."""

import re

import pytest
import torch

from loraswitch.routing import generic
from loraswitch.routing.seq import MAX_THRESHOLD, _fit_temperature, _pick_threshold


def _family_of(prompt: str) -> str:
    """Which template family wrote `prompt` ("open" or a near-miss family)."""
    def fills(templates) -> bool:
        return any(generic._template_pattern(t).fullmatch(prompt) for t in templates)

    if fills(generic._OPEN_TEMPLATES):
        return "open"
    return next(name for name, ts in generic._NEAR_MISS_FAMILIES.items() if fills(ts))


def test_bundled_prompts_mix_open_requests_and_every_near_miss_family():
    prompts = generic.generic_prompts("train", 600)
    assert len(prompts) == len(set(prompts)) == 600
    assert not any(re.search(r"\{[a-z_0-9]+\}", p) for p in prompts)  # every slot filled
    families = [_family_of(p) for p in prompts]
    assert 0.35 < families.count("open") / len(families) < 0.65
    assert set(families) == {"open", *generic._NEAR_MISS_FAMILIES}
    assert prompts == generic.generic_prompts("train", 600)  # the same every time


def test_the_sizes_routers_train_on_are_all_there_and_mostly_near_misses():
    train = generic.generic_prompts("train", generic.BUNDLED_TRAIN)
    val = generic.generic_prompts("val", generic.BUNDLED_VAL)
    assert len(set(train)) == generic.BUNDLED_TRAIN and len(set(val)) == generic.BUNDLED_VAL
    open_share = sum(_family_of(p) == "open" for p in train) / len(train)
    assert 0.25 < open_share < 0.4  # the open requests run out (the module doc says so)
    assert generic.fills_a_template("Multiply 12 by 7.") and not generic.fills_a_template("What is 481 + 342?")


def test_bundled_splits_are_disjoint_and_open_only_on_request():
    train, test = generic.generic_prompts("train", 1000), generic.generic_prompts("test", 100)
    assert len(test) == 100 and not set(train) & set(test)
    assert {_family_of(p) for p in generic.generic_prompts("train", 200, near_misses=False)} == {"open"}
    assert generic.generic_prompts("train", 50, seed=1) != generic.generic_prompts("train", 50, seed=0)


def test_temperature_softens_but_never_sharpens():
    labels = torch.arange(4).repeat(25)
    easy = torch.nn.functional.one_hot(labels, 4).float() * 3.0  # every validation prompt right, by a margin
    assert _fit_temperature(easy, labels) == 1.0  # free, it would sharpen to the grid's end
    assert _fit_temperature(easy, labels, lowest=10 ** -1.5) < 0.1
    noisy = easy.clone()
    noisy[::3] = torch.nn.functional.one_hot((labels[::3] + 1) % 4, 4).float() * 3.0  # a third confidently wrong
    assert _fit_temperature(noisy, labels) > 1.0


def test_abstain_threshold_stays_under_its_ceiling():
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    sure = torch.nn.functional.one_hot(labels, 4).float() * 0.99 + 0.0025
    assert abs(_pick_threshold(sure, labels, none_idx=3) - MAX_THRESHOLD) < 1e-6
    assert abs(_pick_threshold(sure, labels, none_idx=3, ceiling=0.9) - 0.9) < 1e-6
    unsure = torch.full((6, 4), 0.1).scatter(1, labels[:, None], 0.55)  # right, at 0.55
    assert abs(_pick_threshold(unsure, labels, none_idx=3) - 0.55) < 1e-6


def test_a_users_none_file_adds_to_the_bundled_prompts_unless_told_not_to(tmp_path):
    from loraswitch.routing.base import NONE_CLASS
    from loraswitch.routing.data import read_folder

    (tmp_path / "add.txt").write_text("\n".join(f"What is {i} + {i + 7}?" for i in range(30)) + "\n")
    mine = [f"Tell me about planet number {i}." for i in range(10)]
    (tmp_path / "__none__.txt").write_text("\n".join(mine) + "\n")
    train, val = read_folder(tmp_path)
    nones = {p for p, _ in train[NONE_CLASS] + val[NONE_CLASS]}
    # a five-line file used to replace all 2,000 bundled prompts, and the router forgot the rest
    assert set(mine) <= nones and len(nones) == len(mine) + generic.BUNDLED_TRAIN + generic.BUNDLED_VAL
    train, val = read_folder(tmp_path, bundled=False)
    assert {p for p, _ in train[NONE_CLASS] + val.get(NONE_CLASS, [])} == set(mine)
    (tmp_path / "__none__.txt").unlink()
    assert NONE_CLASS not in read_folder(tmp_path, bundled=False)[0]


def test_a_users_router_data_is_reported_before_training(tmp_path, tiny_base, adapter_dir):
    """`train-router` says what it read (from a black-box review: a `.json` file, an empty file and
    an adapter with no file were dropped silently, a latin-1 file's error named no file, and a
    file for an adapter that is not loaded was a traceback); too few prompts to hold any out
    still train (calibrated on the training prompts)."""
    from loraswitch.engine import Engine
    from loraswitch.routing.data import checked_folder, read_folder
    from loraswitch.routing.seq import train_selector

    engine = Engine(tiny_base, [adapter_dir])  # alpha, beta, gamma
    (tmp_path / "alpha.txt").write_text("Convert March 5 to a date.\nSame prompt twice\n")
    (tmp_path / "beta.txt").write_text("Same prompt twice\n")
    (tmp_path / "gamma.txt").write_text("\n")
    (tmp_path / "gamma.json").write_text('{"prompt": "x"}\n')
    train, val = read_folder(tmp_path, bundled=False)
    train, val, counts, notes = checked_folder(engine, tiny_base.tokenizer, tmp_path, train, val)
    said = "\n".join(notes)
    assert counts.startswith("examples read") and "alpha 2" in counts and "beta 1" in counts
    for part in ("gamma.json: not read", "gamma.txt: no prompts", "no examples for gamma", "more than one adapter",
                 "fewer than 5 examples for alpha, beta", "no __none__"):
        assert part in said, (part, said)
    router = train_selector(engine, {k: [p for p, _ in v] for k, v in train.items()},
                            {k: [p for p, _ in v] for k, v in val.items()}, steps=20, progress=False)
    assert router.classes == ["alpha", "beta"] and router.threshold == router.threshold  # not NaN
    (tmp_path / "delta.txt").write_text("a prompt\n")
    with pytest.raises(ValueError, match="not loaded: delta"):
        checked_folder(engine, tiny_base.tokenizer, tmp_path, *read_folder(tmp_path, bundled=False))
    (tmp_path / "delta.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="delta.txt: not UTF-8"):
        read_folder(tmp_path, bundled=False)
