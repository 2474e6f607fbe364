"""The escalation decision on the real demo library: an edge holding half the adapters, with the
library's trained router, sends the tasks it lacks upstream and keeps the ones it holds."""

from __future__ import annotations

import copy
import shutil

import pytest

from loraswitch.base import Base
from loraswitch.constants import DEMO_ADAPTER_DIR, DEMO_ROUTER_DIR
from loraswitch.demo.tasks import examples
from loraswitch.switch import Switch
from loraswitch.switch.escalation import DEFAULT_THRESHOLD, assess

pytestmark = pytest.mark.real
HELD, ABSENT = ("add", "sort_numbers"), ("num_to_french", "reverse_words")


def test_edge_escalates_the_tasks_it_lacks(real_base, tmp_path):
    base = Base(model=copy.deepcopy(real_base.model), tokenizer=real_base.tokenizer, name=real_base.name, source="t")
    for name in HELD:
        (tmp_path / "adapters").mkdir(exist_ok=True)
        (tmp_path / "adapters" / name).symlink_to(DEMO_ADAPTER_DIR / name, target_is_directory=True)
    shutil.copytree(DEMO_ROUTER_DIR, tmp_path / "routers")
    sw = Switch(base, [tmp_path / "adapters"], router_dir=tmp_path / "routers")
    cases = [e for t in HELD + ABSENT for e in examples(t, "test", 4)]
    texts = [e.prompt for e in cases]
    verdicts = assess(sw, texts, [base.chat_ids(t) for t in texts], None, DEFAULT_THRESHOLD)
    for case, v in zip(cases, verdicts):
        assert 0.0 <= v.risk <= 1.0
        if case.task in HELD:
            assert (v.target, v.adapter) == ("adapter", case.task) and v.risk < 0.5, (case.prompt, v)
        else:
            assert v.target == "upstream" and v.local == "base" and v.p_missing > 0.5, (case.prompt, v)
            assert v.base_uncertainty is not None and "not held here" in v.reason
