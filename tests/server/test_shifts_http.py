"""The task-shift endpoints on a server that keeps no prompt texts (the default): the report has
sizes but no examples, export is refused, /metrics counts, and the CLI says why it cannot export."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from loraswitch.cli import app as cli_app
from tests.server.conftest import KEY


def test_shift_report_without_prompts(live, http, tmp_path):
    detector = live.app.state.server.shifts
    assert not detector.keep_prompts
    direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
    for i in range(detector.min_size):  # what the switch hands over for prompts auto abstained on
        detector.record_unrouted(direction + 0.01 * torch.randn(32), f"private prompt {i}")
    report = http.get("/v1/routing/shifts").json()
    shift = next(c for c in report["data"] if c["size"] >= detector.min_size)
    assert shift["examples"] == [] and shift["prompts_kept"] == 0 and report["keep_prompts"] is False
    assert "private prompt" not in http.get("/v1/routing/shifts").text
    r = http.get(f"/v1/routing/shifts/{shift['id']}/prompts")
    assert r.status_code == 409 and r.json()["error"]["code"] == "prompts_not_kept"
    assert http.get("/v1/routing/shifts/c999999/prompts").status_code == 404
    metrics = http.get("/metrics").text
    assert f"loraswitch_unrouted_prompts_total {float(report['unrouted'])}" in metrics
    assert "loraswitch_routing_shifts " in metrics
    out = tmp_path / "x.jsonl"
    result = CliRunner().invoke(cli_app, ["shifts", "export", shift["id"], str(out), "--url", live.url, "--api-key", KEY])
    assert result.exit_code == 1 and "--keep-prompts" in result.output and not out.exists()
    listed = CliRunner().invoke(cli_app, ["shifts", "list", "--url", live.url, "--api-key", KEY])
    assert listed.exit_code == 0 and shift["id"] in listed.output
    assert http.get("/v1/routing/shifts", headers={"Authorization": "Bearer wrong"}).status_code == 401
