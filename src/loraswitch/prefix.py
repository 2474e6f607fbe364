"""The prefix cache: keys and values of prompt openings that earlier prompts shared, so a prefill
computes only what follows them (`PrefixCache`; the engine keeps one, `prefix_cache`). The eager
stepper (`decode.EagerStepper`) looks rows up before its prefill and remembers them after it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from loraswitch.engine import Engine
from loraswitch.kernels import Routing
from loraswitch.padding import LeftPadded

PREFIX_MIN = 8  # the shortest shared opening a prefill reuses (fewer positions save less than the bookkeeping)


@dataclass
class PrefixRow:
    """A prompt the prefix cache may serve: its tokens and the key of its routing (the same
    adapters and weights on every token: LoRA changes the keys and values it would reuse)."""

    key: tuple
    tokens: tuple[int, ...]

    @property
    def n(self) -> int:
        return len(self.tokens)


@dataclass
class PrefixHit:
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
        self.size = 0  # cached positions in `shared` and `seen` together, kept as entries come and go

    def rows(self, engine: Engine, batch: LeftPadded, routing: Routing | None) -> list[PrefixRow | None]:
        """Each row's prompt and routing key; None where its tokens do not share one routing."""
        n_rows, width = batch.input_ids.shape
        lengths = batch.attention_mask.sum(1).tolist()
        if routing is None:
            return [PrefixRow((engine.version,), tuple(batch.input_ids[i, width - n:].tolist())) for i, n in enumerate(lengths)]
        ids = routing.ids.view(n_rows, width, -1)
        ws = routing.weights.view(n_rows, width, -1)
        out: list[PrefixRow | None] = []
        for i, n in enumerate(lengths):
            ri, rw = ids[i, width - n:], ws[i, width - n:]
            if not (bool((ri == ri[0]).all()) and bool((rw == rw[0]).all())):
                out.append(None)
                continue
            key = (engine.version, *((engine.name_of(int(s)), round(float(w), 6))
                                     for s, w in zip(ri[0].tolist(), rw[0].tolist()) if s >= 0 and w != 0))
            out.append(PrefixRow(key, tuple(batch.input_ids[i, width - n:].tolist())))
        return out

    def lookup(self, row: PrefixRow | None) -> PrefixHit | None:
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
        return PrefixHit(best, found[2])

    def remember(self, rows: list[PrefixRow | None], hits: list[PrefixHit | None], cache: DynamicCache, length: int) -> None:
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
                    self.size += k
            if (row.key, row.tokens) not in self.seen:
                self.size += row.n
            self.seen[(row.key, row.tokens)] = kv
            self.seen.move_to_end((row.key, row.tokens))
        self._evict()

    def _evict(self) -> None:
        """Drop the oldest candidates, then the least recently used shared openings, until the
        cached positions fit `max_tokens` (`size` is kept as entries come and go, not recounted)."""
        while (self.seen or self.shared) and self.size > self.max_tokens:
            (_, tokens), _ = (self.seen if self.seen else self.shared).popitem(last=False)
            self.size -= len(tokens)


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


