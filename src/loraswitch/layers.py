"""The multi-LoRA linear layer: `y = W x + sum_e w[t,e] * s_e * B_e A_e x` for per-token routing.

One `MultiLoRALinear` replaces each targeted `nn.Linear` of the base model. It keeps the factors
of every loaded adapter that targets it in two stacks (see `kernels`), and reads the routing for
the current forward pass from a `RoutingContext` shared by all layers of one engine. That context
is the single seam between "which adapters, with what weight" (routers, explicit choice) and "how
to compute it" (kernels): explicit choice, per-request routing and token-level gates differ only
in the `Routing` they put there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from loraswitch.kernels import Routing, WholeStack, add_lora, concat_stack
from loraswitch.library import LoraModule

# per-layer routers (Arrow, learned gates) decide inside the forward pass, from the layer input
DynamicRouter = Callable[[str, torch.Tensor], "Routing | None"]


class RoutingContext:
    """What the layers of one engine read during a forward pass: a static per-token routing,
    or a dynamic router consulted by each layer with its own input."""

    def __init__(self) -> None:
        self.static: Routing | None = None
        self.dynamic: DynamicRouter | None = None

    def routing_for(self, key: str, x2d: torch.Tensor) -> Routing | None:
        if self.dynamic is not None:
            return self.dynamic(key, x2d)
        return self.static


class FactorCache(dict):
    """The layer's cache of derived factors, least recently used first out: at most `max_entries`
    entries and `max_bytes` (the newest entry is always kept, whatever its size). Entries are one
    adapter's contiguous factors (the uniform strategy) or an adapter set's (the per-set stacked
    strategy, only when the whole stack is too wide). Per-token routing at batch 1 is the uniform
    strategy with a new slot most steps: with 4 entries, 8 adapters rebuilt their copies about
    every other step (0.77x merged weights at batch 1; 16 entries keep them all while the bytes
    allow); per-set entries rarely repeat, and the byte bound keeps what they cost small."""

    def __init__(self, max_entries: int = 16, max_bytes: int = 1 << 20):
        super().__init__()
        self.max_entries, self.max_bytes = max_entries, max_bytes

    def get(self, key, default=None):
        value = super().pop(key, None)
        if value is None:
            return default
        super().__setitem__(key, value)  # most recently used last
        return value

    def __setitem__(self, key, value) -> None:
        super().pop(key, None)
        super().__setitem__(key, value)
        while len(self) > 1 and (len(self) > self.max_entries or self.nbytes > self.max_bytes):
            super().pop(next(iter(self)))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for v in self.values() if v for t in v)


class MultiLoRALinear(nn.Module):
    """A base `nn.Linear` plus the stacked LoRA factors of every adapter slot targeting it."""

    def __init__(self, base: nn.Linear, key: str, ctx: RoutingContext):
        super().__init__()
        self.base = base
        self.key = key
        self.ctx = ctx
        w = base.weight
        # stack index 0 is the all-zero "no adapter" slot; adapter slot s lives at index s + 1
        self.register_buffer("A", torch.zeros(1, 0, base.in_features, dtype=w.dtype, device=w.device), persistent=False)
        self.register_buffer("B", torch.zeros(1, base.out_features, 0, dtype=w.dtype, device=w.device), persistent=False)
        # the whole stack concatenated for the stacked / masked strategies (`kernels.concat_stack`),
        # rebuilt whenever the stacks change; buffers, so they move with the layer and a compiled
        # step reads them like A and B. Empty while the stack is too wide to multiply whole.
        self.register_buffer("A_all", torch.zeros(base.in_features, 0, dtype=w.dtype, device=w.device), persistent=False)
        self.register_buffer("B_all", torch.zeros(0, base.out_features, dtype=w.dtype, device=w.device), persistent=False)
        self.register_buffer("col_index", torch.zeros(0, dtype=torch.long, device=w.device), persistent=False)
        self.stack_starts: tuple[int, ...] = (0, 0)  # where each stack index's columns start (`WholeStack`)
        # a plain nn.Linear is called as F.linear on its weight: the module call's own overhead,
        # paid by ~210 linears per decode step, was a measurable share of a batch-1 token
        self.plain = type(base) is nn.Linear
        self.ranks: list[int] = [0]
        self.active = False  # any slot installed; checked on every forward, so kept as a flag
        # concatenated factors per adapter set, for the kernels' stacked strategy; derived from
        # A and B, so every change to the stacks clears it. Bounded (`FactorCache`): per-token
        # routing makes a new adapter set almost every forward, and 64 sets per layer grew a
        # server from 0.7 to 4.7 GB
        self.stacked_cache: dict = FactorCache()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # code that inspects `module.weight` keeps working
        return self.base.weight

    def _grow(self, n_stack: int, rank: int) -> None:
        """Make room for `n_stack` stack entries of rank up to `rank` (zero-padded)."""
        cur_n, cur_r = self.A.shape[0], self.A.shape[1]
        if n_stack <= cur_n and rank <= cur_r:
            return
        n, r = max(n_stack, cur_n), max(rank, cur_r)
        A = self.A.new_zeros(n, r, self.in_features)
        B = self.B.new_zeros(n, self.out_features, r)
        A[:cur_n, :cur_r] = self.A
        B[:cur_n, :, :cur_r] = self.B
        self.A, self.B = A, B
        self.ranks += [0] * (n - len(self.ranks))
        self.stacked_cache.clear()

    def reserve(self, n_slots: int) -> None:
        """Give the stacks room for slots 0..n_slots-1, so any routed slot id indexes safely."""
        self._grow(n_slots + 1, 0)  # new entries have rank 0: the whole-stack operands do not change

    def _restack(self) -> None:
        self.A_all, self.B_all, self.col_index, self.stack_starts = concat_stack(self.A, self.B, self.ranks)

    def set_slot(self, slot: int, module: LoraModule | None) -> None:
        """Install (or with None, clear) adapter slot `slot`'s factors; scale is folded into B."""
        i = slot + 1
        self.stacked_cache.clear()
        if module is None:
            if i < self.A.shape[0]:
                self.A[i].zero_()
                self.B[i].zero_()
                self.ranks[i] = 0
                self._restack()
            self.active = any(self.ranks)
            return
        self._grow(i + 1, module.rank)
        r = module.rank
        self.A[i].zero_()
        self.B[i].zero_()
        self.A[i, :r] = module.A.to(self.A)
        self.B[i, :, :r] = (module.B * module.scale).to(self.B)
        self.ranks[i] = r
        self.active = True
        self._restack()

    def _apply(self, fn, recurse=True):  # .to(device / dtype): the cached factors are stale
        self.stacked_cache.clear()
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ~210 of these run per decode step, so the Python here is part of every token's cost (at
        # batch 1 it was 16 us a call, 3 ms of a 60 ms token): buffers are read from `_buffers`
        # directly (nn.Module's attribute lookup is a Python function), and a forward routed to
        # no adapter returns before any reshaping
        y = F.linear(x, self.base.weight, self.base.bias) if self.plain else self.base(x)
        routing = self.ctx.routing_for(self.key, x)
        if routing is None or not self.active:
            return y
        uniform = routing.uniform_slot() if isinstance(routing, Routing) else None
        if uniform is not None and (uniform < 0 or self.ranks[uniform + 1] == 0):
            return y
        x2 = x.reshape(-1, x.shape[-1])
        if routing.n_tokens != x2.shape[0]:
            raise RuntimeError(f"{self.key}: routing covers {routing.n_tokens} tokens, the input has {x2.shape[0]}")
        b = self._buffers
        # one adapter for every token never reads the whole stack: no operands to gather for it
        stack = None if uniform is not None else WholeStack(b["A_all"], b["B_all"], b["col_index"], self.stack_starts)
        y2 = y.reshape(-1, y.shape[-1])
        out = add_lora(y2, x2, b["A"], b["B"], self.ranks, routing, self.stacked_cache, stack)
        return y if out is y2 else out.view(y.shape)  # in place (inference): y itself holds the sum


def wrap_linear(model: nn.Module, key: str, ctx: RoutingContext) -> MultiLoRALinear:
    """Replace `model.<key>` (an nn.Linear) by a MultiLoRALinear around it, once."""
    module = model.get_submodule(key)
    if isinstance(module, MultiLoRALinear):
        return module
    parent_name, _, child = key.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = MultiLoRALinear(module, key, ctx)
    setattr(parent, child, layer)
    return layer
