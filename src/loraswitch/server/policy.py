"""One generation policy made of several: rows [offset, offset + n) of the batch are routed by
their own policy (explicit adapters, a sequence-level router's decisions, part-by-part switching),
so requests that asked for different things still share one batched forward.

A policy with per-layer routing (`dynamic`: Arrow, learned gates) is consulted by every layer for
*every* token of the forward, so it cannot share a forward with other policies; `RowsPolicy`
refuses that combination and the scheduler gives such a policy its own `generate` call.
"""

from __future__ import annotations

from bisect import bisect_right

from loraswitch.engine import Engine
from loraswitch.generate import Choice, Policy


class RowsPolicy(Policy):
    """Delegates every per-row hook to the policy owning the row, with the row renumbered.

    `parts` lists (policy, row_offset) in increasing offset order; `n_rows` is the batch size.
    Part i owns rows [offset_i, offset_{i+1}) and sees them as rows 0, 1, ...
    """

    def __init__(self, parts: list[tuple[Policy, int]], n_rows: int):
        if not parts:
            raise ValueError("RowsPolicy needs at least one part")
        offsets = [off for _, off in parts]
        if offsets[0] != 0 or offsets != sorted(set(offsets)) or offsets[-1] >= n_rows:
            raise ValueError(f"part offsets {offsets} must start at 0, increase, and stay below {n_rows} rows")
        self.parts = [p for p, _ in parts]
        self.offsets = offsets
        self.ends = offsets[1:] + [n_rows]
        self.n_rows = n_rows
        dynamic = [p for p in self.parts if p.dynamic is not None]
        if dynamic and len(self.parts) > 1:
            raise ValueError("a policy with per-layer (dynamic) routing must have the forward to itself")
        self.dynamic = dynamic[0].dynamic if dynamic else None

    def locate(self, row: int) -> tuple[Policy, int]:
        """(the policy owning `row`, the row's index inside that policy)."""
        i = bisect_right(self.offsets, row) - 1
        if i < 0 or row >= self.n_rows:
            raise IndexError(f"row {row} outside the batch of {self.n_rows}")
        return self.parts[i], row - self.offsets[i]

    def start(self, engine: Engine, prompts: list[list[int]]) -> None:
        for p, lo, hi in zip(self.parts, self.offsets, self.ends):
            p.start(engine, prompts[lo:hi])

    def prompt_choice(self, row: int, prompt: list[int]):
        p, r = self.locate(row)
        return p.prompt_choice(r, prompt)

    def step_choice(self, row: int, generated: list[int]) -> Choice:
        p, r = self.locate(row)
        return p.step_choice(r, generated)

    def override(self, row: int, generated: list[int], token: int) -> int:
        p, r = self.locate(row)
        return p.override(r, generated, token)

    def on_forward(self, rows: list[int], tokens_per_row: int) -> None:
        # a dynamic policy is the only part (offset 0), so it sees the batch order unchanged
        for p, lo, hi in zip(self.parts, self.offsets, self.ends):
            p.on_forward([r - lo for r in rows if lo <= r < hi], tokens_per_row)

    def trace_entry(self, engine: Engine, row: int, choice: Choice) -> dict:
        p, r = self.locate(row)
        return p.trace_entry(engine, r, choice)

    def summary(self, engine: Engine, row: int) -> dict:
        p, r = self.locate(row)
        return p.summary(engine, r)

    def events(self, row: int) -> list[dict]:
        p, r = self.locate(row)
        return p.events(r)
