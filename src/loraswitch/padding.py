"""Left padding, written once: generation, router features, gate and X-LoRA training, AdaMerging
and the adapter trainer all batch prompts of different lengths the same way.

Rows are right-aligned so every row's last prompt token sits in the last column (that is where
the next token is predicted and where answer targets end); positions count real tokens only, so a
padded row sees the same rotary positions as it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LeftPadded:
    """A left-padded batch: token ids, attention mask and position ids, all [rows, width]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])

    def model_inputs(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Keyword arguments for a transformers causal LM forward."""
        return {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device),
                "position_ids": self.position_ids.to(device)}


def left_pad(rows: list[list[int]], pad_id: int, width: int | None = None) -> LeftPadded:
    """Right-align `rows` in a [len(rows), width] batch (width: the longest row by default)."""
    if not rows:
        raise ValueError("left_pad needs at least one row")
    width = max(len(r) for r in rows) if width is None else width
    if any(len(r) > width for r in rows):
        raise ValueError(f"a row is longer than the batch width {width}")
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.as_tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return LeftPadded(ids, mask, positions_of(mask))


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions of a left-padded batch: real tokens count from 0, padding sits at 0."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def tail_targets(rows: list[list[int]], n_targets: list[int]) -> torch.Tensor:
    """Next-token targets for the last `n_targets[i]` tokens of each row, right-aligned in a
    [len(rows), max(n_targets)] tensor, -100 (ignored by cross-entropy) elsewhere. With the rows
    left-padded, these line up with the last positions' logits (`logits_to_keep`)."""
    width = max(n_targets)
    out = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, k) in enumerate(zip(rows, n_targets, strict=True)):
        if k:
            out[i, width - k:] = torch.as_tensor(row[-k:], dtype=torch.long)
    return out
