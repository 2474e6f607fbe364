"""Noticing a new task on a real server: the demo library minus `sort_numbers` (seven adapters,
the demo routers) on the real default model, on loopback. A burst of sort_numbers prompts mixed
with in-library traffic must come out as one reported cluster (>= 80% of the burst in it) and no
cluster may hold 10% of the in-library traffic; /metrics counts them, `loraswitch shifts export`
writes the cluster as an examples file, and allow / deny steer the real selector."""

from __future__ import annotations

import copy
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from typer.testing import CliRunner

from loraswitch.base import Base
from loraswitch.cli import app as cli_app
from loraswitch.constants import DEMO_ADAPTER_DIR, DEMO_ROUTER_DIR
from loraswitch.demo.tasks import TASK_NAMES, examples
from loraswitch.library import read_examples
from loraswitch.server import ServerSettings, create_app
from loraswitch.switch import Switch
from tests.server.conftest import LiveServer

pytestmark = pytest.mark.real
NEW = "sort_numbers"
BURST, PER_TASK, MIN_SIZE = 24, 5, 8


@pytest.fixture(scope="module")
def seven(real_base, tmp_path_factory):
    """A server on the real default with every demo adapter but NEW, keeping prompts."""
    root = tmp_path_factory.mktemp("seven")
    for task in TASK_NAMES:
        if task != NEW:
            shutil.copytree(DEMO_ADAPTER_DIR / task, root / "adapters" / task)
    shutil.copytree(DEMO_ROUTER_DIR, root / "routers")
    # a copy: an engine wraps its model's linears in place, and other tests share `real_base`
    base = Base(model=copy.deepcopy(real_base.model), tokenizer=real_base.tokenizer, name=real_base.name,
                source=real_base.source)
    switch = Switch(base, [root / "adapters"], router_dir=root / "routers")
    settings = ServerSettings(max_batch=16, max_new_tokens=8, default_max_tokens=1, default_temperature=0.0,
                              keep_prompts=True, shift_min_size=MIN_SIZE)
    server = LiveServer(create_app(switch, settings))
    yield server
    server.stop()


def _ask(url: str, prompt: str, **extra) -> dict:
    body = {"model": "auto", "messages": [{"role": "user", "content": prompt}], "max_tokens": 1, **extra}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_burst_of_a_missing_task_is_reported_as_one_shift(seven, tmp_path):
    began = time.monotonic()
    burst = [e.prompt for e in examples(NEW, "test", BURST, seed=3)]
    library = [e.prompt for t in TASK_NAMES if t != NEW for e in examples(t, "test", PER_TASK, seed=3)]
    traffic = [(NEW, p) for p in burst] + [("library", p) for p in library]
    random.Random(0).shuffle(traffic)
    with ThreadPoolExecutor(8) as pool:  # concurrent clients: the server batches them
        answers = list(pool.map(lambda item: _ask(seven.url, item[1]), traffic))
    assert sum(a["routing"]["adapter"] is None for a in answers) >= BURST * 0.8  # nobody takes the new task

    report = httpx.get(seven.url + "/v1/routing/shifts").json()
    assert report["data"], report
    members = {c["id"]: set(httpx.get(f"{seven.url}/v1/routing/shifts/{c['id']}/prompts").json()["data"])
               for c in report["data"]}
    top = max(members, key=lambda c: len(members[c] & set(burst)))
    assert len(members[top] & set(burst)) >= 0.8 * BURST, report
    for prompts in members.values():
        assert len(prompts & set(library)) < 0.1 * len(library), report
    shift = next(c for c in report["data"] if c["id"] == top)
    assert len(shift["examples"]) == 5 and set(shift["examples"]) <= set(burst)

    metrics = httpx.get(seven.url + "/metrics").text
    unrouted = float(next(line.split()[-1] for line in metrics.splitlines()
                          if line.startswith("loraswitch_unrouted_prompts_total")))
    assert unrouted == report["unrouted"] >= 0.8 * BURST
    assert f"loraswitch_routing_shifts {float(len(report['data']))}" in metrics

    path = tmp_path / "new_task.jsonl"
    result = CliRunner().invoke(cli_app, ["shifts", "export", top, str(path), "--url", seven.url])
    assert result.exit_code == 0, result.output
    out = [p for p, _ in read_examples(path)]  # the library's examples format
    assert set(out) == members[top] and len(out) == shift["size"]
    assert time.monotonic() - began < 60


def test_allow_and_deny_steer_the_selector(seven):
    date = "Convert to ISO date: March 5, 2021"
    assert _ask(seven.url, date)["routing"]["adapter"] == "iso_date"
    denied = _ask(seven.url, date, loraswitch={"deny": ["iso_date"]})["routing"]
    assert denied["adapter"] != "iso_date" and denied["scores"].get("iso_date", 0) == 0
    assert denied["deny"] == ["iso_date"]
    only = _ask(seven.url, date, loraswitch={"allow": ["add", "to_json"]})["routing"]
    assert only["adapter"] in (None, "add", "to_json") and only["allow"] == ["add", "to_json"]
    before = httpx.get(seven.url + "/v1/routing/shifts").json()["unrouted"]
    _ask(seven.url, date, loraswitch={"allow": []})  # told to abstain: not evidence of a new task
    assert httpx.get(seven.url + "/v1/routing/shifts").json()["unrouted"] == before
