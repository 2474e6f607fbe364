"""The headline of a growing library on the real default: hot-loading an adapter the selector has
never seen leaves the demo prompts routed as before (it used to make the selector stale, and
`auto` fell back to Arrow for every prompt)."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraswitch.base import Base
from loraswitch.constants import DEMO_ADAPTER_DIR, DEMO_ROUTER_DIR
from loraswitch.demo.tasks import TASK_NAMES, examples, out_of_suite
from loraswitch.routing.base import NONE_CLASS
from loraswitch.routing.features import prompt_features
from loraswitch.switch import Switch

pytestmark = pytest.mark.real


def _legacy_decisions(router, feats) -> list[str | None]:
    """The selector's decision rule as it was before added heads existed."""
    probs = torch.softmax(router.logits(feats) / router.temperature, -1)
    conf, top = probs.max(-1)
    return [None if router.classes[t] == NONE_CLASS or c < router.threshold else router.classes[t]
            for c, t in zip(conf.tolist(), top.tolist())]


def test_hot_loading_an_unrelated_adapter_keeps_the_demo_routing(real_base, tmp_path):
    base = Base(model=copy.deepcopy(real_base.model), tokenizer=real_base.tokenizer, name=real_base.name, source="t")
    shutil.copytree(DEMO_ROUTER_DIR, tmp_path / "routers")
    sw = Switch(base, router_dir=tmp_path / "routers")
    prompts = [e.prompt for t in TASK_NAMES for e in examples(t, "test", 3)] + out_of_suite("test", 3)
    want = [t for t in TASK_NAMES for _ in range(3)] + [None] * 3
    router = sw.router("auto").inner
    feats = prompt_features(sw.engine, prompts, router.layer)
    before = router.route_features(sw.engine, feats)
    assert [d.adapter for d in before] == _legacy_decisions(router, feats)  # nothing added: as before
    assert [d.adapter for d in before] == want

    src = DEMO_ADAPTER_DIR / "iso_date"  # same shape, random weights, a new name
    (tmp_path / "unrelated").mkdir()
    shutil.copy(src / "adapter_config.json", tmp_path / "unrelated")
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(v.shape, generator=g) * v.float().std() for k, v in load_file(src / "adapter_model.safetensors").items()},
              tmp_path / "unrelated" / "adapter_model.safetensors")
    sw.engine.load_adapter(tmp_path / "unrelated")
    auto = sw.router("auto")
    assert not auto.note and auto.describe(sw.engine)["unrelated"]["source"] == "zero-shot"
    after = auto.inner.route_features(sw.engine, feats)
    # the zero-shot head may claim about 1% of traffic (its threshold claims 1% of the reservoir;
    # the growing-library benchmark: 3 of 360 demo test prompts): every decision it does not
    # claim is exactly the one made before, and it claims at most one of these 27
    claimed = [a for a in after if a.source != "trained"]
    assert len(claimed) <= 1 and all(a.adapter == "unrelated" and a.source == "zero-shot" for a in claimed)
    assert [(a.adapter, a.confidence) for a in after if a.source == "trained"] == \
        [(b.adapter, b.confidence) for a, b in zip(after, before) if a.source == "trained"]
