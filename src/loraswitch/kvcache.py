"""A KV cache that appends in place: what the eager decode loop runs on.

transformers' `DynamicCache` grows by `torch.cat` in every layer at every step, so each decode
step copies the whole cache (keys and values of every row, layer and position so far) once more,
a copy that grows with the context (benchmarks/kv_cache_ab.py: 1.05x decode at batch 16 without
it, 32-token prompts and answers).
`GrowingCache` keeps each layer's keys and values as views of buffers with spare positions; a
step writes its one position into the spare room, and only a full buffer (every
`max(SPARE_MIN, length // 4)` positions), a batch whose rows changed or a cache rebuilt from
tensors (joins, trims, prefix hits) copies. The attention reads the same keys and values either
way (a view of the first `length` positions), so the logits are the same.

It is a `DynamicCache` in every other respect (`batch_select_indices`, `crop`, `layers[i].keys`),
so the decode loop, the prefix cache and transformers' models use it unchanged. The memory price
is the spare room: at most a quarter of the cache, or SPARE_MIN positions.

`trimmed` and `merged` are what continuous batching does to caches: drop the leading positions
no row attends to any more, and stack two batches' caches along the batch, each right-aligned
(left-padded, masked) to the longer one. Both steppers' joins go through them.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [rows, heads, positions, head_dim]

SPARE_MIN = 16  # positions of room a buffer gets at least: a copy every 16 steps instead of every step


class GrowingLayer(DynamicLayer):
    """One layer's keys and values, [batch, heads, length, head_dim] views of larger buffers."""

    def __init__(self) -> None:
        super().__init__()
        self._room: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        new = old + key_states.shape[-2]
        if not self._fits(key_states, new):
            b, h, _, d = key_states.shape
            size = new + max(SPARE_MIN, new // 4)
            room = (key_states.new_empty(b, h, size, d), value_states.new_empty(b, h, size, value_states.shape[-1]))
            if old:
                room[0][:, :, :old], room[1][:, :, :old] = self.keys, self.values
            self._room = room
        keys, values = self._room
        keys[:, :, old:new], values[:, :, old:new] = key_states, value_states
        self.keys, self.values = keys[:, :, :new], values[:, :, :new]
        return self.keys, self.values

    def _fits(self, key_states: torch.Tensor, new: int) -> bool:
        """Whether the next positions go into the current buffers: the keys are still their
        leading view (`batch_select_indices` or a rebuild replaces them with other tensors) and
        there is room for `new` positions of the same rows."""
        room = self._room
        if room is None or self.keys.dim() != 4:
            return False
        buf = room[0]
        return (self.keys.data_ptr() == buf.data_ptr() and self.keys.stride() == buf.stride()
                and buf.shape[2] >= new and buf.shape[:2] == key_states.shape[:2]
                and buf.dtype == key_states.dtype and buf.device == key_states.device)

    def reset(self) -> None:
        self._room = None
        super().reset()


class GrowingCache(DynamicCache):
    """A `DynamicCache` of `GrowingLayer`s (module docstring); `kv` fills it from tensors, as
    `DynamicCache(ddp_cache_data=...)` does."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        super().__init__()
        self.layer_class_to_replicate = GrowingLayer
        self.layers = []
        for keys, values in kv or []:
            layer = GrowingLayer()
            layer.update(keys, values)
            self.layers.append(layer)


def kv_of(cache) -> KV:
    """A cache's keys and values per layer (any transformers cache with `layers`)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def trimmed(kv: KV, mask: torch.Tensor) -> tuple[KV, torch.Tensor]:
    """Keys and values per layer and their [rows, positions] mask without the leading positions
    that no row attends to (padding, or the context of rows that have left)."""
    used = mask.any(0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    return [(k[:, :, start:], v[:, :, start:]) for k, v in kv], mask[:, start:]


def merged(*batches: tuple[KV, torch.Tensor]) -> tuple[KV, torch.Tensor]:
    """Batches' (keys and values, mask) stacked along the batch after trimming each, every one
    right-aligned to the longest (zeros and mask 0 before). Positions are per row, so every row
    attends to what it did alone."""
    batches = tuple(trimmed(kv, mask) for kv, mask in batches)
    length = max(mask.shape[1] for _, mask in batches)
    kv = [(_stacked([b[0][i][0] for b in batches], length, 2), _stacked([b[0][i][1] for b in batches], length, 2))
          for i in range(len(batches[0][0]))]
    return kv, _stacked([mask for _, mask in batches], length, 1)


def _stacked(parts: list[torch.Tensor], length: int, dim: int) -> torch.Tensor:
    """The parts' rows one after another, each right-aligned to `length` along `dim` and zero
    before (masked positions): one allocation, and only the padding written with zeros."""
    shape = list(parts[0].shape)
    shape[0], shape[dim] = sum(x.shape[0] for x in parts), length
    out = parts[0].new_empty(shape)
    row = 0
    for x in parts:
        part, n = out[row : row + x.shape[0]], x.shape[dim]
        part.narrow(dim, 0, length - n).zero_()
        part.narrow(dim, length - n, n).copy_(x)
        row += x.shape[0]
    return out
