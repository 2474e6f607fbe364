"""`kvcache.GrowingCache`: the eager decode loop's cache appends in place, and the model sees the
same keys and values as with transformers' DynamicCache: the same logits step by step, through
rows leaving the batch, a crop and a rebuild from tensors."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from loraswitch.kvcache import SPARE_MIN, GrowingCache
from loraswitch.padding import left_pad


def _run(model, cache, steps: int = 20):
    """Prefill a left-padded batch of 3, decode `steps` tokens (row 1 leaves after 5 steps);
    every step's logits, and each step's data pointer of layer 0's keys."""
    batch = left_pad([[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]], 2)
    with torch.no_grad():
        out = model(**batch.model_inputs(), past_key_values=cache, use_cache=True)
    mask, pos = batch.attention_mask, batch.position_ids[:, -1] + 1
    tokens, logits, pointers = out.logits[:, -1].argmax(-1), [], []
    for step in range(steps):
        if step == 5:  # a finished row leaves
            keep = torch.tensor([0, 2])
            cache.batch_select_indices(keep)
            mask, pos, tokens = mask[keep], pos[keep], tokens[keep]
        mask = torch.cat([mask, torch.ones(len(tokens), 1, dtype=torch.long)], 1)
        with torch.no_grad():
            out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=pos[:, None],
                        past_key_values=cache, use_cache=True)
        pos, tokens = pos + 1, out.logits[:, -1].argmax(-1)
        logits.append(out.logits[:, -1])
        pointers.append(cache.layers[0].keys.data_ptr())
    return logits, pointers


def test_same_logits_as_dynamic_cache_and_steps_write_in_place(tiny_base):
    model = tiny_base.model.eval()
    want, _ = _run(model, DynamicCache())
    got, pointers = _run(model, GrowingCache())
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # a step writes into the spare room: the keys move only when the buffer is full or rows left
    moves = sum(a != b for a, b in zip(pointers, pointers[1:]))
    assert moves <= 1 + len(pointers) // SPARE_MIN, pointers


def test_rebuilt_and_cropped_cache_keeps_its_contents(tiny_base):
    g = torch.Generator().manual_seed(0)
    kv = [(torch.randn(2, 3, 7, 4, generator=g), torch.randn(2, 3, 7, 4, generator=g)) for _ in range(2)]
    cache = GrowingCache(kv)
    assert cache.get_seq_length() == 7 and torch.equal(cache.layers[1].values, kv[1][1])
    cache.crop(-2)  # drop the last two positions; the next update overwrites them
    new = torch.randn(2, 3, 1, 4, generator=g)
    keys, values = cache.update(new, new + 1, 0)
    assert keys.shape == (2, 3, 6, 4)
    torch.testing.assert_close(keys, torch.cat([kv[0][0][:, :, :5], new], 2))
    torch.testing.assert_close(values, torch.cat([kv[0][1][:, :, :5], new + 1], 2))
    cache.reset()
    assert cache.get_seq_length() == 0
