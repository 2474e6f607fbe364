"""The forward passes of one generation: the prefill, then one token per live row per step.

`generate` owns the bookkeeping (sampling, stop tokens, listeners); a stepper owns the KV cache,
the attention mask and the positions, and runs the model. Two kinds, picked per generation by
`stepper_for`:

* `EagerStepper`  - a cache that grows by one position per step, in place (`kvcache`), and drops finished rows;
                    each step packs the rows' choices into a `kernels.Routing`. Runs any policy,
                    per-layer (dynamic) routers included.
* `StaticStepper` - a static cache and fixed-shape routing buffers, so that `torch.compile` turns
                    the whole step into one graph (`static`), where the engine asks for it.

Both take rows that join between steps (continuous batching, `generate`'s `admit`): the joining
rows are prefilled here, on an eager cache of their own, then merged in.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from loraswitch.engine import Engine
from loraswitch.kernels import Routing
from loraswitch.kvcache import GrowingCache, kv_of, merged, trimmed
from loraswitch.layers import DynamicRouter
from loraswitch.padding import LeftPadded, positions_of
from loraswitch.prefix import PrefixHit, PrefixRow, prefix_cache
from loraswitch.static import Choice, Decoder, StaticStepper, buckets, cache_length, device_of

__all__ = ["Choice", "EagerStepper", "StaticStepper", "buckets", "pack", "stepper_for"]

def pack(choices: list[Choice], lengths: list[int]) -> Routing:
    """Rows' choices -> one Routing over the flattened [rows, length] tokens."""
    k = max(len(c[0]) for c in choices)
    if all(n == 1 for n in lengths):  # a decode step: one tensor per field, not one per row
        return Routing(torch.tensor([s + [-1] * (k - len(s)) for s, _ in choices], dtype=torch.long),
                       torch.tensor([list(w) + [0.0] * (k - len(w)) for _, w in choices]))
    ids, ws = [], []
    for (slots, weights), n in zip(choices, lengths):
        pad = k - len(slots)
        ids.append(torch.tensor(slots + [-1] * pad, dtype=torch.long).expand(n, k))
        ws.append(torch.tensor(weights + [0.0] * pad).expand(n, k))
    return Routing(torch.cat(ids), torch.cat(ws))


class EagerStepper:
    """Prefill and steps on a cache that grows in place (`kvcache.GrowingCache`; module docstring)."""

    def __init__(self, engine: Engine, batch: LeftPadded):
        self.engine, self.batch = engine, batch
        self.device = device_of(engine)
        self.cache = GrowingCache()
        self.mask = batch.attention_mask
        self.next_pos = batch.position_ids[:, -1] + 1

    @property
    def width(self) -> int:
        return self.batch.width

    def prefill(self, routing: Routing | None, dynamic: DynamicRouter | None, logits_to_keep: int):
        """The prompts' forward, in one piece (`prefill_chunks`)."""
        for out in self.prefill_chunks(routing, dynamic, logits_to_keep, None):
            if out is not None:
                return out

    def prefill_chunks(self, routing: Routing | None, dynamic: DynamicRouter | None, logits_to_keep: int,
                       chunk: int | None) -> Iterator:
        """The prompts' forward, `chunk` positions at a time (None: all at once), yielding after
        each: None until the last, then its output (`logits_to_keep` last positions' logits).
        Rows whose opening an earlier prompt already computed under the same adapters
        (`PrefixCache`) start from those keys and values and run only the rest; per-layer routers
        and full-prompt logits (echo) always run the whole prompt."""
        store = prefix_cache(self.engine)
        with self.engine.lock:  # the engine's one prefix cache, shared by every generation
            rows = store.rows(self.engine, self.batch, routing) if store and dynamic is None and logits_to_keep == 1 else None
            hits = [store.lookup(r) for r in rows] if rows else []
        if any(h is not None for h in hits):
            ids, positions, done = self._after_hits(rows, hits)
        else:
            ids, positions, done = self.batch.input_ids, self.batch.position_ids, 0
        n_rows, n_cols = ids.shape  # the last n_cols columns of the batch are computed
        step = chunk or n_cols
        for a in range(0, n_cols, step):
            b = min(n_cols, a + step)
            skip = self.width - n_cols
            with self.engine.routed(_columns(routing, n_rows, self.width, skip + a, skip + b), dynamic):
                out = self.engine.model(input_ids=ids[:, a:b].to(self.device),
                                        attention_mask=self.mask[:, : done + b].to(self.device),
                                        position_ids=positions[:, a:b].to(self.device), past_key_values=self.cache,
                                        use_cache=True, logits_to_keep=logits_to_keep)
            if b < n_cols:
                yield None
        if rows:
            with self.engine.lock:
                store.remember(rows, hits, self.cache, self.mask.shape[1])
        yield out

    def _after_hits(self, rows: list[PrefixRow | None], hits: list[PrefixHit | None]):
        """The cache with cached openings in place, for a prefill of the rest: row i's m_i cached
        positions right-aligned in a region of P = max m_i positions (masked before them), then its
        remaining tokens left-padded to the longest remainder W, at positions m_i, m_i + 1, ...
        Returns those [rows, W] token ids and positions, and P."""
        n_rows, width = self.batch.input_ids.shape
        m = [h.length if h is not None else 0 for h in hits]
        n = [r.n if r is not None else int(c) for r, c in zip(rows, self.batch.attention_mask.sum(1).tolist())]
        P, W = max(m), max(a - b for a, b in zip(n, m))
        kv = []
        for layer, (k0, _) in enumerate(next(h for h in hits if h is not None).kv):
            K = k0.new_zeros(n_rows, k0.shape[0], P, k0.shape[2])
            V = torch.zeros_like(K)
            for i, (h, k) in enumerate(zip(hits, m)):
                if h is not None:
                    K[i, :, P - k:], V[i, :, P - k:] = h.kv[layer][0][:, :k], h.kv[layer][1][:, :k]
            kv.append((K.to(self.device), V.to(self.device)))
        self.cache = GrowingCache(kv)
        self.mask = torch.zeros(n_rows, P + W, dtype=torch.long)
        for i, (a, k) in enumerate(zip(n, m)):
            self.mask[i, P - k : P] = 1
            self.mask[i, P + W - (a - k):] = 1
        positions = torch.tensor(m)[:, None] + positions_of(self.mask[:, P:])
        return self.batch.input_ids[:, width - W:], positions, P

    def join(self, other: EagerStepper) -> None:
        """Append `other`'s rows (prefilled on their own cache) to this batch: both caches lose
        the leading positions none of their rows attends to, the shorter is left-padded (masked)
        to the other's length, then keys, values, masks and next positions are stacked along the
        batch. Positions are per row, so every row decodes as it would alone."""
        kv, self.mask = merged((kv_of(self.cache), self.mask), (kv_of(other.cache), other.mask))
        self.cache = GrowingCache(kv)
        self.next_pos = torch.cat([self.next_pos, other.next_pos])

    def trim(self) -> None:
        """Drop the leading cache positions no row attends to any more: after a long row left a
        batch that rows joined, the others no longer pay attention over its length (every step
        reads the whole cache)."""
        if bool(self.mask[:, 0].any()):
            return
        kv, self.mask = trimmed(kv_of(self.cache), self.mask)
        self.cache = GrowingCache(kv)

    def select(self, keep: list[int]) -> None:
        """Only the batch positions `keep` go on (rows that finished leave the cache)."""
        idx = torch.tensor(keep, dtype=torch.long)
        self.cache.batch_select_indices(idx.to(self.device))
        self.mask, self.next_pos = self.mask[idx], self.next_pos[idx]

    def step(self, tokens: list[int], choices: list[Choice], dynamic: DynamicRouter | None) -> torch.Tensor:
        """Consume one token per live row; the next-token logits [live rows, vocab]."""
        self.mask = torch.cat([self.mask, torch.ones(len(tokens), 1, dtype=torch.long)], dim=1)
        with self.engine.routed(pack(choices, [1] * len(tokens)), dynamic):
            out = self.engine.model(
                input_ids=torch.tensor(tokens, device=self.device)[:, None], attention_mask=self.mask.to(self.device),
                position_ids=self.next_pos[:, None].to(self.device), past_key_values=self.cache, use_cache=True)
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1]


def _columns(routing: Routing | None, n_rows: int, width: int, a: int, b: int) -> Routing | None:
    """The part of a [rows x width] prefill routing that covers columns [a, b) of every row."""
    if routing is None or (a, b) == (0, width):
        return routing
    c = routing.ids.shape[1]
    return Routing(routing.ids.view(n_rows, width, c)[:, a:b].reshape(-1, c),
                   routing.weights.view(n_rows, width, c)[:, a:b].reshape(-1, c))


def stepper_for(engine: Engine, batch: LeftPadded, max_new_tokens: int,
                dynamic: DynamicRouter | None) -> EagerStepper | StaticStepper:
    """The static (compiled) stepper where the engine asks for it and the policy allows it (no
    per-layer dynamic router: those decide from each layer's input in Python), else the eager one.
    A frozen decoder (after `generate.warm_up`) that compiled no step for this batch's cache length
    bucket leaves it to the eager loop, faster than the static step run uncompiled."""
    if not getattr(engine, "compile", False) or dynamic is not None or max_new_tokens < 2:
        return EagerStepper(engine, batch)
    if engine.decoder is None:
        c = engine.compile
        engine.decoder = Decoder("inductor" if c is True else None if c == "none" else str(c), device_of(engine))
    if engine.decoder.frozen and not engine.decoder.compiled_for(cache_length(batch.width + max_new_tokens)):
        return EagerStepper(engine, batch)
    return StaticStepper(engine, EagerStepper(engine, batch), max_new_tokens)


def join_into(running: EagerStepper | StaticStepper, joined: EagerStepper, any_running: bool,
              steps: int) -> EagerStepper | StaticStepper:
    """The stepper of the running rows followed by the joined ones, for at most `steps` more
    steps (a static cache keeps the compiled step, even once every running row has left)."""
    if isinstance(running, StaticStepper):
        running.join(joined.cache, joined.mask, joined.next_pos, steps)
        return running
    if not any_running:
        return joined
    running.join(joined)
    return running
