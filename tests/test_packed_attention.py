"""`base._packed_sdpa`: the engine's attention packs a one-token query onto the key/value heads of
a grouped-query model instead of repeating the keys and values, in eager decoding and, what
transformers' own SDPA path does not do, under torch.compile. Same logits as transformers' SDPA."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from loraswitch.base import PACKED_SDPA
from loraswitch.engine import Engine
from loraswitch.padding import left_pad


def _decode_step(model, batch, step_fn=None):
    """Prefill a left-padded batch, then one decode step: that step's logits."""
    cache = DynamicCache()
    model(**batch.model_inputs(), past_key_values=cache, use_cache=True)
    mask = torch.cat([batch.attention_mask, torch.ones(2, 1, dtype=torch.long)], 1)
    inputs = dict(input_ids=torch.tensor([[3], [4]]), attention_mask=mask,
                  position_ids=batch.position_ids[:, -1:] + 1, past_key_values=cache, use_cache=True)
    return (model if step_fn is None else step_fn)(**inputs).logits


def test_engine_attention_packs_single_token_queries_and_matches_sdpa(tiny_base, monkeypatch):
    reference = copy.deepcopy(tiny_base.model)
    Engine(tiny_base)
    assert tiny_base.model.config._attn_implementation == PACKED_SDPA
    assert reference.config._attn_implementation == "sdpa"
    batch = left_pad([[5, 6, 7, 8, 9], [11, 12]], 2)
    queries = []
    real = F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        queries.append(tuple(q.shape))
        return real(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    want = _decode_step(reference, batch)
    queries.clear()
    got = _decode_step(tiny_base.model, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the step's queries went in packed: [batch, kv heads 2, 4 / 2 query heads each, head dim]
    assert queries[-1] == (2, 2, 2, 16)
    monkeypatch.setattr(F, "scaled_dot_product_attention", real)
    torch._dynamo.reset()
    traced = torch.compile(tiny_base.model, backend="eager", fullgraph=True)  # the compiled step's tracing
    torch.testing.assert_close(_decode_step(tiny_base.model, batch, traced), want, rtol=1e-5, atol=1e-5)
