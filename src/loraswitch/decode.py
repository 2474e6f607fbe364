"""The forward passes of one generation: the prefill, then one token per live row per step.

`generate` owns the bookkeeping (sampling, stop tokens, listeners); a stepper owns the KV cache,
the attention mask and the positions, and runs the model. Two kinds, picked per generation by
`stepper_for`:

* `EagerStepper`  - a cache that grows by one position per step, in place (`kvcache`), and drops finished rows;
                    each step packs the rows' choices into a `kernels.Routing`. Runs any policy,
                    per-layer (dynamic) routers included.
* `StaticStepper` - a StaticCache of a fixed length bucket; rows stay in the batch until the end
                    (a finished row decodes padding nobody reads) and the routing sits in
                    fixed-shape `SlotRouting` buffers written in place, so every step has the same
                    shapes and the same code path. That is what lets `torch.compile` (inductor)
                    turn the whole step, LoRA included, into one graph with no Python in the
                    per-layer loop: at batch 1 the eager step is mostly framework overhead (30
                    layers of small ops), not arithmetic.

The compiled step lives on the engine (`Engine(compile=...)`, a `Decoder`), reused by later
generations, with its static caches kept and reset rather than reallocated. Its batch dimension is
dynamic: one graph serves every batch of two rows or more (batch 1 is a graph of its own), so it
compiles once per cache length bucket, choices per token and whether any row is routed (a step
with no adapter routed skips the LoRA term), not once per batch size: a server meeting batches of
1 to 32 rows would otherwise have compiled 32 times (a minute or more each on a CPU). The prefill
stays eager (its length varies per request). If compilation is unavailable or fails, the step
falls back to the same static path run eagerly, once, with a warning; the tokens are the same
either way.
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator

import torch
from transformers import DynamicCache, StaticCache

from loraswitch.engine import Engine
from loraswitch.kernels import Routing, SlotRouting
from loraswitch.kvcache import GrowingCache
from loraswitch.layers import DynamicRouter
from loraswitch.padding import LeftPadded, positions_of
from loraswitch.prefix import PrefixHit, PrefixRow, prefix_cache

Choice = tuple[list[int], list[float]]  # adapter slots and their weights for one token; -1 = none
# static caches come in power-of-two lengths from here. Short: a compiled step does work in
# proportion to its cache length (attention over every position, the cache and mask updates),
# and at 256 a batch of 16 short requests decoded at 0.76x of the eager loop, at 64 1.01x
# (benchmarks/compiled_step.py); the price is a compile per bucket a generation reaches
MIN_CACHE_LEN = 64
MAX_STATIC_CACHES = 2  # (batch, length) caches kept per engine; each holds B x L keys and values


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


def cache_length(needed: int) -> int:
    """The static cache length bucket for `needed` positions (a power of two, >= MIN_CACHE_LEN)."""
    n = MIN_CACHE_LEN
    while n < needed:
        n *= 2
    return n


def _device(engine: Engine) -> torch.device:
    return next(engine.model.parameters()).device


class EagerStepper:
    """Prefill and steps on a cache that grows in place (`kvcache.GrowingCache`; module docstring)."""

    def __init__(self, engine: Engine, batch: LeftPadded):
        self.engine, self.batch = engine, batch
        self.device = _device(engine)
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
        (mine, mask), (theirs, their_mask) = _trimmed(self.cache, self.mask), _trimmed(other.cache, other.mask)
        length = max(mask.shape[1], their_mask.shape[1])
        self.cache = GrowingCache([(_stacked(a, c, length, 2), _stacked(b, d, length, 2))
                                   for (a, b), (c, d) in zip(mine, theirs)])
        self.mask = _stacked(mask, their_mask, length, 1)
        self.next_pos = torch.cat([self.next_pos, other.next_pos])

    def trim(self) -> None:
        """Drop the leading cache positions no row attends to any more: after a long row left a
        batch that rows joined, the others no longer pay attention over its length (every step
        reads the whole cache)."""
        if bool(self.mask[:, 0].any()):
            return
        kv, self.mask = _trimmed(self.cache, self.mask)
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


def _trimmed(cache: DynamicCache, mask: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """A cache's keys and values per layer and its mask, without the leading positions that no
    row attends to (padding, or the context of rows that have left)."""
    used = mask.any(0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    return [(lay.keys[:, :, start:], lay.values[:, :, start:]) for lay in cache.layers], mask[:, start:]


def _stacked(a: torch.Tensor, b: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`a`'s rows then `b`'s, each right-aligned to `length` along `dim` and zero before (masked
    positions): one allocation, and only the padding written with zeros."""
    shape = list(a.shape)
    shape[0], shape[dim] = a.shape[0] + b.shape[0], length
    out = a.new_empty(shape)
    for part, x in ((out[: a.shape[0]], a), (out[a.shape[0]:], b)):
        n = x.shape[dim]
        part.narrow(dim, 0, length - n).zero_()
        part.narrow(dim, length - n, n).copy_(x)
    return out


class _Static:
    """One (batch, length) shape's state, kept across generations: the cache, the mask, and the
    token / position / routing buffers the compiled step reads (same tensors every step)."""

    def __init__(self, engine: Engine, rows: int, length: int, k: int):
        device = _device(engine)
        self.cache = StaticCache(config=engine.model.config, max_cache_len=length)
        self.mask = torch.zeros(rows, length, dtype=torch.long, device=device)
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.resize(k, device)

    def resize(self, k: int, device: torch.device) -> None:
        rows = self.tokens.shape[0]
        self.routing = SlotRouting(torch.full((rows, k), -1, dtype=torch.long, device=device),
                                   torch.zeros(rows, k, device=device))


def _forward(model, input_ids, attention_mask, position_ids, cache):
    """The step `torch.compile` traces: one token per row through the model on a static cache."""
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 past_key_values=cache, use_cache=True).logits[:, -1]


class Decoder:
    """An engine's compiled decode step and the static caches it runs on (module docstring).
    `backend`: a torch.compile backend ("inductor"; "eager" traces without code generation, as
    the tests do), or None for the static path without compilation."""

    def __init__(self, backend: str | None, device: torch.device | None = None):
        self.backend = backend
        self.fn = None
        if backend is not None:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            # on a GPU the step is also captured as a CUDA graph (one launch per token); every
            # buffer it reads is the same tensor each step, which is what replaying needs
            mode = "reduce-overhead" if backend == "inductor" and device is not None and device.type == "cuda" else None
            # dynamic: the batch size is symbolic (module docstring); the cache length is not
            # (transformers' StaticCache keeps it as a Python int, so each bucket traces anew)
            self.fn = torch.compile(_forward, backend=backend, dynamic=True, fullgraph=True, mode=mode)
        self.states: OrderedDict[tuple[int, int], _Static] = OrderedDict()
        self.failed: str | None = None  # why compilation was given up (then steps run eagerly)
        self.compile_s: dict[tuple[int, int, int], float] = {}  # first call per (rows, length, k): a compile or a reuse

    def state(self, engine: Engine, rows: int, length: int, k: int) -> _Static:
        key = (rows, length)
        st = self.states.pop(key, None) or _Static(engine, rows, length, k)
        self.states[key] = st
        while len(self.states) > MAX_STATIC_CACHES:
            self.states.popitem(last=False)
        if st.routing.ids.shape[1] < k:
            st.resize(k, st.tokens.device)
        return st

    def run(self, model, st: _Static, routed: bool = True) -> torch.Tensor:
        """One step; `routed` False: the step with no LoRA term (keyed with 0 choices per token)."""
        args = (model, st.tokens, st.mask, st.positions, st.cache)
        if self.fn is None or self.failed:
            return _forward(*args)
        key = (*st.mask.shape, st.routing.ids.shape[1] if routed else 0)
        saved = [getattr(layer, "cumulative_length", torch.zeros(())).clone() for layer in st.cache.layers]
        t0 = time.perf_counter()
        try:
            out = self.fn(*args)
        except Exception as exc:  # no compiler, an untraceable model...: the eager step, same tokens
            for layer, n in zip(st.cache.layers, saved):  # a partly run step must not count
                if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
                    layer.cumulative_length.copy_(n)
            self.failed = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"loraswitch: compiled decode unavailable, decoding eagerly ({self.failed[:200]})", stacklevel=2)
            return _forward(*args)
        self.compile_s.setdefault(key, round(time.perf_counter() - t0, 2))
        return out


class StaticStepper:
    """Prefill and steps on a static cache with fixed-shape routing buffers (module docstring)."""

    def __init__(self, engine: Engine, batch: LeftPadded, max_new_tokens: int):
        self.engine, self.batch = engine, batch
        self.decoder: Decoder = engine.decoder
        rows, width = batch.input_ids.shape
        self.st = self.decoder.state(engine, rows, cache_length(width + max_new_tokens), 1)
        self.st.cache.reset()
        self.st.mask.zero_()
        self.st.mask[:, :width] = batch.attention_mask.to(self.st.mask.device)
        self.st.positions.copy_(batch.position_ids[:, -1:] + 1)
        self.t = width  # the cache position the next step writes
        self.live = list(range(rows))  # batch positions of the rows still answering

    @property
    def width(self) -> int:
        return self.batch.width

    def prefill(self, routing: Routing | None, dynamic: DynamicRouter | None, logits_to_keep: int):
        with self.engine.routed(routing, dynamic):
            return self.engine.model(**self.batch.model_inputs(self.st.mask.device), past_key_values=self.st.cache,
                                     use_cache=True, logits_to_keep=logits_to_keep)

    def select(self, keep: list[int]) -> None:
        self.live = [self.live[b] for b in keep]

    def step(self, tokens: list[int], choices: list[Choice], dynamic: DynamicRouter | None) -> torch.Tensor:
        st = self.st
        k = max(len(c[0]) for c in choices)
        if st.routing.ids.shape[1] < k:
            st.resize(k, st.tokens.device)
        rows, k = st.routing.ids.shape
        ids = torch.full((rows, k), -1, dtype=torch.long)
        ws = torch.zeros(rows, k)
        for b, (slots, weights) in zip(self.live, choices):
            ids[b, : len(slots)] = torch.tensor(slots, dtype=torch.long)
            ws[b, : len(weights)] = torch.tensor(weights, dtype=ws.dtype)
        st.routing.ids.copy_(ids)
        st.routing.weights.copy_(ws)
        st.tokens[self.live, 0] = torch.tensor(tokens, dtype=torch.long, device=st.tokens.device)
        st.mask[:, self.t] = 1
        # a step where no row uses an adapter runs the base model's own step (a graph of its
        # own): routed to "no adapter", the masked path would still multiply every loaded factor
        routed = bool(((ids >= 0) & (ws != 0)).any())
        with self.engine.routed(st.routing if routed else None):
            logits = self.decoder.run(self.engine.model, st, routed)
        st.positions.add_(1)
        self.t += 1
        return logits[self.live]


def stepper_for(engine: Engine, batch: LeftPadded, max_new_tokens: int,
                dynamic: DynamicRouter | None) -> EagerStepper | StaticStepper:
    """The static (compiled) stepper where the engine asks for it and the policy allows it (no
    per-layer dynamic router: those decide from each layer's input in Python), else the eager one."""
    if not getattr(engine, "compile", False) or dynamic is not None or max_new_tokens < 2:
        return EagerStepper(engine, batch)
    if engine.decoder is None:
        c = engine.compile
        engine.decoder = Decoder("inductor" if c is True else None if c == "none" else str(c), _device(engine))
    return StaticStepper(engine, batch, max_new_tokens)
