"""The compiled decode step: a static KV cache, fixed-shape routing buffers, `torch.compile`.

`StaticStepper` runs a generation on a StaticCache of a fixed length bucket; rows stay in the
batch until they leave (a finished row decodes padding nobody reads) and the routing sits in
fixed-shape `SlotRouting` buffers written in place, so every step has the same shapes and the
same code path. That is what lets `torch.compile` (inductor) turn the whole step, LoRA included,
into one graph with no Python in the per-layer loop: at batch 1 the eager step is mostly framework
overhead (30 layers of small ops), not arithmetic.

The compiled step lives on the engine (`Engine(compile=...)`, a `Decoder`), reused by later
generations, with its static caches kept and reset rather than reallocated. Its batch dimension is
dynamic: one graph serves every batch of two rows or more (batch 1 is a graph of its own), and
one graph serves every cache length bucket (with CUDA graphs: from the second bucket on,
`_any_length`); it compiles per choices
per token and whether any row is routed (a step with no adapter routed skips the LoRA term), not
once per batch size: a server meeting batches of
1 to 32 rows would otherwise have compiled 32 times (a minute or more each on a CPU). The prefill
stays eager (its length varies per request). If compilation is unavailable or fails, the step
falls back to the same static path run eagerly, once, with a warning; the tokens are the same
either way.

Continuous batching runs on it too (`join`): rows prefilled on an eager cache of their own
(chunked, through the prefix cache) take the slots of rows that left, in place, where they fit;
otherwise the state is rebuilt with the live rows and the joined ones, which the dynamic batch
dimension serves without a new compile while the length bucket stays the same. Where the step
replays CUDA graphs (a GPU), which torch records per batch size and per tensor addresses, states
hold their rows in slot sizes (`slot_rows`) and more are kept, so a stream of joins replays a
few graphs instead of recording one per row count (docs/benchmarks.md, the H200 joins run).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import OrderedDict

import torch
from transformers import DynamicCache, StaticCache

from loraswitch.engine import Engine
from loraswitch.kernels import Routing, SlotRouting
from loraswitch.kvcache import KV, kv_of, merged, trimmed
from loraswitch.layers import DynamicRouter

log = logging.getLogger("loraswitch.decode")
Choice = tuple[list[int], list[float]]  # adapter slots and their weights for one token; -1 = none
# static caches come in power-of-two lengths from here. Short: a compiled step does work in
# proportion to its cache length (attention over every position, the cache and mask updates),
# and at 256 a batch of 16 short requests decoded at 0.76x of the eager loop, at 64 1.01x
# (benchmarks/compiled_step.py); with CUDA graphs the price is a compile for the second bucket
# too (longer ones reuse its graph, `Decoder.covers`), without none (`_any_length`)
MIN_CACHE_LEN = 64
MAX_STATIC_CACHES = 2  # (batch, length) caches kept per engine; each holds B x L keys and values
# with CUDA graphs (`Decoder.graphed`): more kept, since a state made anew has new addresses and
# its first step records a new graph; rows come in slot sizes (`slot_rows`), so they are few
MAX_GRAPHED_CACHES = 8
GRAPHED_CACHE_BYTES = 2**30  # ... while they hold no more than this, or twice the largest kept
COMPACT_MIN_LEFT = 4  # rows that left a static batch before it is compacted (`StaticStepper.trim`)


def buckets(up_to: int) -> list[int]:
    """Every cache length bucket from the shortest to the one that holds `up_to` positions."""
    out = [MIN_CACHE_LEN]
    while out[-1] < up_to:
        out.append(out[-1] * 2)
    return out


def cache_length(needed: int) -> int:
    """The static cache length bucket for `needed` positions (a power of two, >= MIN_CACHE_LEN)."""
    return buckets(needed)[-1]


def slot_rows(rows: int) -> int:
    """The rows of a static state that CUDA graphs replay: 2, 4, 8, then multiples of 8 (the
    padding rows are free slots, masked). A graph is recorded per batch size and per set of
    tensor addresses, so a server whose batches join and compact all day would otherwise record
    one for every row count it meets, each kept by torch; padded, a handful serve every batch,
    and the spare slots take later joins in place. One row takes two slots: dynamo traces a batch
    of one apart from the symbolic batch of two or more, so a graphed server would compile every
    graph twice (a minute or more each for SmolLM2 on a GPU), while a second row adds little to a
    step that kernel launches bound (not yet timed on a card: docs/benchmarks.md, the served path).
    Its cost is memory: a request decoding alone holds a second row's KV cache (0.5 GB per 4,096
    positions for a 7B-shaped model in bf16)."""
    return max(2, 1 << (rows - 1).bit_length()) if rows <= 8 else -(-rows // 8) * 8


def device_of(engine: Engine) -> torch.device:
    return next(engine.model.parameters()).device


class _Static:
    """One (batch, length) shape's state, kept across generations: the cache, the mask, and the
    token / position / routing buffers the compiled step reads (same tensors every step)."""

    def __init__(self, engine: Engine, rows: int, length: int, k: int):
        device = device_of(engine)
        cfg = engine.model.config
        self.cache = StaticCache(config=cfg, max_cache_len=length)
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        width = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        itemsize = next(engine.model.parameters()).dtype.itemsize
        self.nbytes = 2 * cfg.num_hidden_layers * heads * width * rows * length * itemsize  # keys and values
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
            # dynamic: the batch size is symbolic (module docstring); the cache length is too
            # without CUDA graphs (`_any_length`); with them transformers' fixed-address marks fix
            # it at first, so the second bucket traces anew, and dynamo then makes the length
            # symbolic (automatic dynamic shapes): that graph serves every other bucket (`covers`)
            self.fn = torch.compile(_forward, backend=backend, dynamic=True, fullgraph=True, mode=mode)
        # CUDA graphs: states in slot sizes and more of them kept (`slot_rows`)
        self.graphed = self.fn is not None and mode == "reduce-overhead"
        # without CUDA graphs the cache length is symbolic from the first compile (`_any_length`)
        self.any_length = not self.graphed
        self.states: OrderedDict[tuple[int, int], _Static] = OrderedDict()
        self.failed: str | None = None  # why compilation was given up (then steps run eagerly)
        self.compile_s: dict[tuple[int, int, int], float] = {}  # first call per (rows, length, k): a compile or a reuse
        # once `frozen` (after a server's warm-up) a shape `covers` does not answer for runs
        # uncompiled, the same tokens, rather than stopping every row of its batch for a compile
        # of minutes on a CPU; `uncompiled` lists those met
        self.frozen = False
        self.uncompiled: set[tuple[int, int, int]] = set()

    @property
    def graphs(self) -> set[tuple[int, int, int]]:
        """The (one row or several, length, k) shapes that ran compiled."""
        return {(min(rows, 2), length, k) for rows, length, k in self.compile_s}

    def covers(self, graph: tuple[int, int, int]) -> bool:
        """Whether a step of this shape (one row or several, length, choices) runs without a
        compile: it ran before, or its rows and choices ran at any cache length (`any_length`)
        or, with CUDA graphs, at two already, after which dynamo has made the length symbolic
        (automatic dynamic shapes: the second length recompiles once into a graph for any
        length), so every other bucket reuses that graph."""
        graphs = self.graphs
        if graph in graphs:
            return True
        rows, _, k = graph
        return len({g[1] for g in graphs if g[0] == rows and g[2] == k}) >= (1 if self.any_length else 2)

    def compiled_for(self, length: int) -> bool:
        """Whether a batch of this cache length bucket decodes compiled with no compile (several
        rows, one adapter choice or none); with no backend every bucket counts: nothing compiles."""
        return self.fn is None or any(self.covers((2, length, k)) for k in (0, 1))

    def state(self, engine: Engine, rows: int, length: int, k: int) -> _Static:
        """The (rows, length) state, kept or made; the least recently used go beyond the count kept,
        and with CUDA graphs also while the kept hold more than GRAPHED_CACHE_BYTES and twice the
        largest one (the bound two states gave: a 7B model's state of 32 rows x 4096 positions
        holds 17 GB)."""
        key = (rows, length)
        st = self.states.pop(key, None) or _Static(engine, rows, length, k)
        self.states[key] = st

        def too_many() -> bool:
            if len(self.states) > (MAX_GRAPHED_CACHES if self.graphed else MAX_STATIC_CACHES):
                return True
            sizes = [s.nbytes for s in self.states.values()]
            return self.graphed and sum(sizes) > max(2 * max(sizes), GRAPHED_CACHE_BYTES)

        while too_many():
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
        graph = (min(key[0], 2), *key[1:])
        if self.frozen and not self.covers(graph):
            if graph not in self.uncompiled:
                self.uncompiled.add(graph)
                log.warning("decoding %s rows x %s positions x %s choices uncompiled: not compiled at warm-up",
                            "1" if graph[0] == 1 else "2+", *key[1:])
            return _forward(*args)
        saved = [getattr(layer, "cumulative_length", torch.zeros(())).clone() for layer in st.cache.layers]
        first = key not in self.compile_s  # a compile may come: counted, and timed for `compile_s`
        t0, traced = time.perf_counter(), _traced() if first else 0
        try:
            out = self.fn(*args)
        except Exception as exc:  # no compiler, an untraceable model...: the eager step, same tokens
            for layer, n in zip(st.cache.layers, saved):  # a partly run step must not count
                if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
                    layer.cumulative_length.copy_(n)
            self.failed = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"loraswitch: compiled decode unavailable, decoding eagerly ({self.failed[:200]})", stacklevel=2)
            return _forward(*args)
        if first:
            self._check_any_length(graph, _traced() > traced)
            self.compile_s[key] = round(time.perf_counter() - t0, 2)
        return out

    def _check_any_length(self, graph: tuple[int, int, int], compiled: bool) -> None:
        """`any_length` is what dynamo did for the models tried, not a promise: if a step whose rows
        and choices ran compiled at another length compiled again, this model's cache length did
        not stay symbolic, and `covers` goes back to asking for two lengths (after which dynamo
        makes it symbolic), so a frozen decoder does not count on a graph it lacks."""
        if compiled and self.any_length and any(g[0] == graph[0] and g[2] == graph[2] and g[1] != graph[1]
                                                  for g in self.graphs):
            self.any_length = False
            log.warning("the compiled step traced a second cache length: it was not symbolic for this model")


def _traced() -> int:
    """Graphs dynamo has traced in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _any_length(st: _Static) -> None:
    """Let one compiled graph take every cache length. transformers marks a static cache's keys
    and values as fixed addresses, which CUDA graphs need to replay in-place updates, and which
    also fixes their shapes: the first length bucket compiled for its length alone and the second
    compiled again (minutes each on a CPU) before dynamo made the length symbolic. Without CUDA
    graphs the mark buys nothing, so it is dropped and the length marked dynamic, in the cache
    and in the attention mask (tied to it)."""
    for layer in st.cache.layers:
        for t in (layer.keys, layer.values):
            if hasattr(t, "_dynamo_static_input_type"):
                del t._dynamo_static_input_type
            torch._dynamo.maybe_mark_dynamic(t, 2)
    torch._dynamo.maybe_mark_dynamic(st.mask, 1)


class StaticStepper:
    """Prefill and steps on a static cache with fixed-shape routing buffers (module docstring)."""

    def __init__(self, engine: Engine, prefiller, max_new_tokens: int):
        """`prefiller`: the eager stepper of the same batch (`decode.EagerStepper`). The prompts
        are read on its cache, through the prefix cache and in one piece, then copied into the
        static one: one prefill for both steppers, and the compiled step gets the prefix cache."""
        self.engine, self.prefiller, self.steps = engine, prefiller, max_new_tokens
        self._width: int = prefiller.width
        self.decoder: Decoder = engine.decoder
        self.st: _Static | None = None
        self.t = 0  # the cache position the next step writes
        self.live: list[int] = []  # batch positions of the rows still answering

    @property
    def width(self) -> int:
        return self._width

    def prefill(self, routing: Routing | None, dynamic: DynamicRouter | None, logits_to_keep: int):
        eager, self.prefiller = self.prefiller, None  # its cache goes once copied
        out = eager.prefill(routing, dynamic, logits_to_keep)
        self._rebuild([(kv_of(eager.cache), eager.mask, eager.next_pos)], self.steps)
        return out

    def select(self, keep: list[int]) -> None:
        self.live = [self.live[b] for b in keep]

    def trim(self) -> None:
        """With rows joining (continuous batching), a batch where at least COMPACT_MIN_LEFT rows
        have left and they are as many as the live ones is rebuilt with only those: every step
        computes every slot, left or not. Fewer leavers keep their slots for rows that join (in
        place, no rebuild): a few idle rows cost little in a step that reads every weight anyway."""
        left = self.st.mask.shape[0] - len(self.live)
        if self.live and left >= max(COMPACT_MIN_LEFT, len(self.live)):
            self._rebuild([], self.st.mask.shape[1] - self.t)

    def join(self, cache: DynamicCache, mask: torch.Tensor, next_pos: torch.Tensor, steps: int) -> None:
        """Add rows prefilled on an eager cache of their own (`cache`, its [rows, positions] `mask`
        and the rows' next positions; `decode.EagerStepper`'s) for at most `steps` more
        steps of the batch. Where enough rows have left, their context fits before the write
        position and the bucket has `steps` positions left, they take the leavers' slots in place
        (same tensors, no new shape); otherwise the static state is rebuilt with the live rows
        and the joined ones (a longer bucket where needed: `Decoder.covers` says whether its step
        runs compiled without a compile).
        Positions are per row and padding is masked, so every row decodes as it would alone.
        Before any state (a first batch read in chunks, `generate`), its rows make the first."""
        kv, mask = trimmed(kv_of(cache), mask)
        n, width = mask.shape
        live = set(self.live)
        free = [b for b in range(self.st.mask.shape[0]) if b not in live] if self.st is not None else []
        if len(free) >= n and width <= self.t and self.t + steps <= self.st.mask.shape[1]:
            self._place(free[:n], kv, mask, next_pos)
        else:
            self._rebuild([(kv, mask, next_pos)], steps)

    def _place(self, slots: list[int], kv: KV, mask: torch.Tensor, next_pos: torch.Tensor) -> None:
        """Joined rows into free slots: their context right-aligned to the write position (what
        a leaver left before it is masked)."""
        st, t, width = self.st, self.t, mask.shape[1]
        idx = torch.tensor(slots, dtype=torch.long, device=st.mask.device)
        for layer, (k, v) in zip(st.cache.layers, kv):
            layer.keys[idx, :, t - width : t] = k.to(layer.keys.device)
            layer.values[idx, :, t - width : t] = v.to(layer.values.device)
        st.mask[idx] = 0
        st.mask[idx, t - width : t] = mask.to(st.mask.device)
        st.positions[idx, 0] = next_pos.to(st.positions.device)
        self.live += slots

    def _rebuild(self, joined: list[tuple[KV, torch.Tensor, torch.Tensor]], steps: int) -> None:
        """A static state of the live rows then the `joined` ones (keys and values, mask, next
        positions), with the leading positions none of them attends to dropped; the current
        bucket if `steps` more positions fit, else the one that holds them. After the prefill the
        prompts' rows are the joined ones of an empty batch."""
        st, t = self.st, self.t
        parts = [(k, m, p.cpu()) for k, m, p in joined]
        if self.live:
            idx = torch.tensor(self.live, dtype=torch.long, device=st.mask.device)
            parts.insert(0, ([(lay.keys[idx, :, :t], lay.values[idx, :, :t]) for lay in st.cache.layers],
                             st.mask[idx, :t], st.positions[idx, 0].cpu()))
        kv, mask = merged(*[(k, m) for k, m, _ in parts])
        positions = torch.cat([p for _, _, p in parts])
        rows, length = mask.shape
        fits = st is not None and length + steps <= st.mask.shape[1]
        size = st.mask.shape[1] if fits else cache_length(length + steps)
        slots = slot_rows(rows) if self.decoder.graphed else rows
        new = self.decoder.state(self.engine, slots, size, st.routing.ids.shape[1] if st is not None else 1)
        new.cache.reset()
        made = not new.cache.layers[0].is_initialized  # a state made now: its tensors come next
        for layer, (k, v) in zip(new.cache.layers, kv):
            if not layer.is_initialized:
                layer.lazy_initialization(k.new_empty(slots, *k.shape[1:]), v)  # it reads k's rows, v's width
            layer.keys[:rows, :, :length], layer.values[:rows, :, :length] = k, v
            layer.cumulative_length.fill_(length)
        if made and self.decoder.any_length:
            _any_length(new)
        new.mask.zero_()
        new.mask[:rows, :length] = mask.to(new.mask.device)
        new.positions.zero_()
        new.positions[:rows, 0] = positions.to(new.positions.device)
        self.st, self.t, self.live = new, length, list(range(rows))

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
