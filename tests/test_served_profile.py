"""The routing feature pass with the chat template's opening computed once gives the features of
the plain pass, and every batch `Switch.run` forms reports where its time went (issue 17)."""

from __future__ import annotations

import torch

from loraswitch.engine import Engine
from loraswitch.routing.features import _template_prefix, prompt_features
from loraswitch.switch import Switch
from loraswitch.switch.request import Handle, Request

PROMPTS = ["What is 2 + 2?", "Rewrite this date in ISO format: June 11, 2084. Then say hi.", "", "x",
           "\nstarts with a newline", "word " * 400]  # the last is clipped to MAX_TOKENS


def test_shared_prefix_features_match_the_plain_pass(tiny_base, adapter_dir):
    engine = Engine(tiny_base, [adapter_dir])
    assert len(_template_prefix(engine)) > 10  # the system prompt and the user turn's header
    for layer in (0, 1):
        shared = prompt_features(engine, PROMPTS, layer, batch_size=4)
        plain = prompt_features(engine, PROMPTS, layer, batch_size=4, shared_prefix=False)
        assert shared.shape == plain.shape == (len(PROMPTS), 2 * tiny_base.model.config.hidden_size)
        torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-5)
    alone = prompt_features(engine, PROMPTS[:1], 1)
    torch.testing.assert_close(alone, prompt_features(engine, PROMPTS, 1)[:1], rtol=1e-4, atol=1e-5)


def test_batches_report_their_phases(tiny_base, adapter_dir, tmp_path):
    switch = Switch(tiny_base, [adapter_dir], router_dir=tmp_path / "none")
    handles = [Handle(Request.chat(p, model=m, max_tokens=3)) for p, m in [("hi", "alpha"), ("yo", "base")]]
    batches = switch.run(handles)
    phases = batches[0]["phases"]
    assert {"route", "prefill", "decode", "listener", "segment", "template"} <= set(phases)
    assert all(v >= 0 for b in batches for v in b["phases"].values())
    assert phases["prefill"] <= batches[0]["seconds"] + 1e-6
