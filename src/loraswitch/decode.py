"""The forward passes of one generation: the prefill, then one token per live row per step.

`generate` owns the bookkeeping (sampling, stop tokens, listeners); a stepper owns the KV cache,
the attention mask and the positions, and runs the model. Two kinds, picked per generation by
`stepper_for`:

* `EagerStepper`  - a DynamicCache that grows by one position per step and drops finished rows;
                    each step packs the rows' choices into a `kernels.Routing`. Runs any policy,
                    per-layer (dynamic) routers included.
* `StaticStepper` - a StaticCache of a fixed length bucket; rows stay in the batch until the end
                    (a finished row decodes padding nobody reads) and the routing sits in
                    fixed-shape `SlotRouting` buffers written in place, so every step has the same
                    shapes and the same code path. That is what lets `torch.compile` (inductor)
                    turn the whole step, LoRA included, into one graph with no Python in the
                    per-layer loop: at batch 1 the eager step is mostly framework overhead (30
                    layers of small ops), not arithmetic.

The compiled step lives on the engine (`Engine(compile=...)`, a `Decoder`): compiled once per
(batch size, cache length bucket, choices per token) and reused by later generations, with its
static caches kept and reset rather than reallocated. The prefill stays eager (its length varies
per request). If compilation is unavailable or fails, the step falls back to the same static
path run eagerly, once, with a warning; the tokens are the same either way.
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache

from loraswitch.engine import Engine
from loraswitch.kernels import Routing, SlotRouting
from loraswitch.layers import DynamicRouter
from loraswitch.padding import LeftPadded, positions_of

Choice = tuple[list[int], list[float]]  # adapter slots and their weights for one token; -1 = none
# static caches come in power-of-two lengths from here. Short: a compiled step does work in
# proportion to its cache length (attention over every position, the cache and mask updates),
# and at 256 a batch of 16 short requests decoded at 0.76x of the eager loop, at 64 1.01x
# (benchmarks/compiled_step.py); the price is a compile per bucket a generation reaches
MIN_CACHE_LEN = 64
PREFIX_MIN = 8  # the shortest shared opening a prefill reuses (fewer positions save less than the bookkeeping)
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


@dataclass
class _Row:
    """A prompt the prefix cache may serve: its tokens and the key of its routing (the same
    adapters and weights on every token: LoRA changes the keys and values it would reuse)."""

    key: tuple
    tokens: tuple[int, ...]

    @property
    def n(self) -> int:
        return len(self.tokens)


@dataclass
class _Hit:
    length: int  # cached positions the row starts from
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, keys and values [kv heads, >= length, head dim]


class PrefixCache:
    """Keys and values of prompt openings shared by earlier prompts under the same adapters, so
    a prefill computes only what follows them (vLLM's automatic prefix caching, at the
    granularity of a shared opening rather than of fixed blocks). Every templated chat prompt
    opens with the same tokens (the system prompt and the user header: 24 of ~45 for the demo),
    so this halves short prompts' prefill.

    Only openings that two *different* prompts began with are served (`shared`): each prefill
    remembers its prompts as candidates (`seen`, the most recent, evicted first), and a new prompt's
    longest common start with a candidate, when at least PREFIX_MIN tokens, becomes a shared
    entry. A prompt repeated verbatim is therefore not served from its own earlier copy: the
    benchmarks that repeat their prompts measure the prefill of what is not shared. Entries are
    keyed by the adapters' names and weights and the engine's library version; least recently
    used first out beyond `max_tokens` cached positions."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.shared: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()  # (key, tokens)
        self.seen: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.hits = 0  # rows served, and the positions they did not compute
        self.saved_tokens = 0

    def rows(self, engine: Engine, batch: LeftPadded, routing: Routing | None) -> list[_Row | None]:
        """Each row's prompt and routing key; None where its tokens do not share one routing."""
        n_rows, width = batch.input_ids.shape
        lengths = batch.attention_mask.sum(1).tolist()
        if routing is None:
            return [_Row((engine.version,), tuple(batch.input_ids[i, width - n:].tolist())) for i, n in enumerate(lengths)]
        ids = routing.ids.view(n_rows, width, -1)
        ws = routing.weights.view(n_rows, width, -1)
        out: list[_Row | None] = []
        for i, n in enumerate(lengths):
            ri, rw = ids[i, width - n:], ws[i, width - n:]
            if not (bool((ri == ri[0]).all()) and bool((rw == rw[0]).all())):
                out.append(None)
                continue
            key = (engine.version, *((engine.name_of(int(s)), round(float(w), 6))
                                     for s, w in zip(ri[0].tolist(), rw[0].tolist()) if s >= 0 and w != 0))
            out.append(_Row(key, tuple(batch.input_ids[i, width - n:].tolist())))
        return out

    def lookup(self, row: _Row | None) -> _Hit | None:
        """The longest shared opening of `row` (at most all but its last token), if worth it."""
        if row is None:
            return None
        best, found = 0, None
        for (key, tokens), kv in self.shared.items():
            if key == row.key:
                k = min(_common(tokens, row.tokens), row.n - 1)
                if k > best:
                    best, found = k, (key, tokens, kv)
        if found is None or best < PREFIX_MIN:
            return None
        self.shared.move_to_end(found[:2])
        self.hits += 1
        self.saved_tokens += best
        return _Hit(best, found[2])

    def remember(self, rows: list[_Row | None], hits: list[_Hit | None], cache: DynamicCache, length: int) -> None:
        """Keep the prompts computed from scratch as candidates, and the openings they share
        with earlier candidates as shared entries. Row i's positions are the last n_i of the
        cache's `length` (the prompts are right-aligned)."""
        for i, (row, hit) in enumerate(zip(rows, hits)):
            if row is None or hit is not None:
                continue
            kv = [(lay.keys[i, :, length - row.n : length].clone(), lay.values[i, :, length - row.n : length].clone())
                  for lay in cache.layers]
            for (key, tokens), other in list(self.seen.items()):
                k = _common(tokens, row.tokens)
                if key == row.key and tokens != row.tokens and k >= PREFIX_MIN and (key, row.tokens[:k]) not in self.shared:
                    self.shared[(key, row.tokens[:k])] = [(a[:, :k].clone(), b[:, :k].clone()) for a, b in other]
            self.seen[(row.key, row.tokens)] = kv
            self.seen.move_to_end((row.key, row.tokens))
        self._evict()

    def _evict(self) -> None:
        def size() -> int:
            return sum(len(t) for _, t in self.shared) + sum(len(t) for _, t in self.seen)

        while (self.seen or self.shared) and size() > self.max_tokens:
            (self.seen if self.seen else self.shared).popitem(last=False)


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the common start of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_cache(engine: Engine) -> PrefixCache | None:
    """The engine's prefix cache (`Engine.prefix_tokens` positions; 0: none)."""
    budget = getattr(engine, "prefix_tokens", 0)
    if not budget:
        return None
    if engine.prefixes is None or engine.prefixes.max_tokens != budget:
        engine.prefixes = PrefixCache(budget)
    return engine.prefixes


class EagerStepper:
    """Prefill and steps on a growing DynamicCache (module docstring)."""

    def __init__(self, engine: Engine, batch: LeftPadded):
        self.engine, self.batch = engine, batch
        self.device = _device(engine)
        self.cache = DynamicCache()
        self.mask = batch.attention_mask
        self.next_pos = batch.position_ids[:, -1] + 1

    @property
    def width(self) -> int:
        return self.batch.width

    def prefill(self, routing: Routing | None, dynamic: DynamicRouter | None, logits_to_keep: int):
        """The prompts' forward. Rows whose opening an earlier prompt already computed under the
        same adapters (`PrefixCache`) start from those keys and values and run only the rest;
        per-layer routers and full-prompt logits (echo) always run the whole prompt."""
        store = prefix_cache(self.engine)
        with self.engine.lock:  # the engine's one cache, shared by every generation
            rows = store.rows(self.engine, self.batch, routing) if store and dynamic is None and logits_to_keep == 1 else None
            hits = [store.lookup(r) for r in rows] if rows else []
            if any(h is not None for h in hits):
                out = self._prefill_after(rows, hits, routing)
            else:
                with self.engine.routed(routing, dynamic):
                    out = self.engine.model(**self.batch.model_inputs(self.device), past_key_values=self.cache,
                                            use_cache=True, logits_to_keep=logits_to_keep)
            if rows:
                store.remember(rows, hits, self.cache, self.mask.shape[1])
        return out

    def _prefill_after(self, rows: list[_Row | None], hits: list[_Hit | None], routing: Routing):
        """The prefill with cached openings: row i's m_i cached positions right-aligned in a
        region of P = max m_i positions (masked before them), then its remaining tokens
        left-padded to the longest remainder, at positions m_i, m_i + 1, ..."""
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
        self.cache = DynamicCache(ddp_cache_data=kv)
        self.mask = torch.zeros(n_rows, P + W, dtype=torch.long)
        for i, (a, k) in enumerate(zip(n, m)):
            self.mask[i, P - k : P] = 1
            self.mask[i, P + W - (a - k):] = 1
        positions = torch.tensor(m)[:, None] + positions_of(self.mask[:, P:])
        c = routing.ids.shape[1]
        tail = Routing(routing.ids.view(n_rows, width, c)[:, width - W:].reshape(-1, c),
                       routing.weights.view(n_rows, width, c)[:, width - W:].reshape(-1, c))
        with self.engine.routed(tail):
            return self.engine.model(input_ids=self.batch.input_ids[:, width - W:].to(self.device),
                                     attention_mask=self.mask.to(self.device), position_ids=positions.to(self.device),
                                     past_key_values=self.cache, use_cache=True, logits_to_keep=1)

    def select(self, keep: list[int]) -> None:
        """Only the batch positions `keep` go on (rows that finished leave the cache)."""
        idx = torch.tensor(keep)
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
            self.fn = torch.compile(_forward, backend=backend, dynamic=False, fullgraph=True, mode=mode)
        self.states: OrderedDict[tuple[int, int], _Static] = OrderedDict()
        self.failed: str | None = None  # why compilation was given up (then steps run eagerly)
        self.compile_s: dict[tuple[int, int, int], float] = {}  # first (compiling) call per shape

    def state(self, engine: Engine, rows: int, length: int, k: int) -> _Static:
        key = (rows, length)
        st = self.states.pop(key, None) or _Static(engine, rows, length, k)
        self.states[key] = st
        while len(self.states) > MAX_STATIC_CACHES:
            self.states.popitem(last=False)
        if st.routing.ids.shape[1] < k:
            st.resize(k, st.tokens.device)
        return st

    def run(self, model, st: _Static) -> torch.Tensor:
        args = (model, st.tokens, st.mask, st.positions, st.cache)
        if self.fn is None or self.failed:
            return _forward(*args)
        key = (*st.mask.shape, st.routing.ids.shape[1])
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
        with self.engine.routed(st.routing):
            logits = self.decoder.run(self.engine.model, st)
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
