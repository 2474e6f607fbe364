"""`generate`: rows of one batch routed by different policies share one forward and answer as
they would alone (left padding, `RowsPolicy`); a listener can end rows early; max_new_tokens=0."""

from __future__ import annotations

import pytest

from loraswitch.engine import Engine
from loraswitch.generate import FixedPolicy, Listener, RowsPolicy, SamplingParams, explicit, generate
from loraswitch.routing.arrow import ArrowRouter


@pytest.fixture
def engine(tiny_base, adapter_dir):
    return Engine(tiny_base, [adapter_dir])


def test_rows_policy_matches_separate_generations(engine):
    prompts = [engine.base.chat_ids(p) for p in ("one", "two two", "three three three")]
    params = SamplingParams(max_new_tokens=5, temperature=0)
    alone = [generate(engine, [p], explicit(engine, [n]), params)[0].token_ids
             for p, n in zip(prompts, ["alpha", "alpha", "beta"])]
    mixed = RowsPolicy([(explicit(engine, ["alpha", "alpha"]), 0), (explicit(engine, ["beta"]), 2)], 3)
    together = generate(engine, prompts, mixed, params)
    assert [g.token_ids for g in together] == alone  # left-padded greedy rows == alone
    assert together[2].trace[0]["adapters"] == {"beta": 1.0}
    arrow = ArrowRouter(engine).policy(engine, ["x"])
    with pytest.raises(ValueError, match="dynamic"):
        RowsPolicy([(arrow, 0), (FixedPolicy([([-1], [1.0])]), 1)], 2)
    assert RowsPolicy([(arrow, 0)], 1).dynamic is not None
    with pytest.raises(ValueError, match="offsets"):
        RowsPolicy([(explicit(engine, ["alpha"]), 1)], 2)


def test_listener_ends_rows_early_and_sees_each_end(engine):
    prompts = [engine.base.chat_ids(p) for p in ("one", "two")]
    seen, ended = [], {}

    class StopRowZero(Listener):
        def token(self, row, gen):
            seen.append((row, gen.token_ids[-1]))
            return "cancelled" if row == 0 and len(gen.token_ids) == 2 else None

        def finished(self, row, gen):
            ended[row] = (gen.finish_reason, gen.text, list(gen.events))

    params = SamplingParams(max_new_tokens=6, stop_ids=set())
    out = generate(engine, prompts, explicit(engine, ["alpha", "gamma"]), params, StopRowZero())
    assert len(out[0].token_ids) == 2 and len(out[1].token_ids) == 6
    assert ended[0][0] == "cancelled" and ended[1][0] == "length"
    assert ended[1][1] == out[1].text and len(seen) == 8
    assert [g.finish_reason for g in generate(engine, prompts, None, SamplingParams(max_new_tokens=0))] == ["length"] * 2
