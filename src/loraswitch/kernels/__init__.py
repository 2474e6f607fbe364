"""Batched multi-LoRA kernels: every way of computing `sum_e w[t,e] * B_e A_e x_t` sits behind
`add_lora`, so the layer never knows which one ran (cf. vLLM's punica wrapper).

Weights are stacked per module: `A[s]` is slot s's [r_max, in] factor and `B[s]` its scaled
[out, r_max] factor, zero-padded to the largest rank; slot 0 is all zeros and stands for "no
adapter", so a token routed nowhere costs nothing special. Four strategies, picked per call:

* uniform  - every token uses one adapter with weight 1 (an explicit choice): two matmuls, the
             same arithmetic as PEFT's unmerged forward; at inference on contiguous transposed
             copies of that adapter's factors cached by the layer (one GEMM each, add fused).
* stacked  - inference with few distinct adapters in the batch (U of them, U * r_max <= STACK_MAX_COLS):
             the U adapters' factors are concatenated once per layer and adapter set ([in, U*r] and
             [U*r, out], cached by the layer), and every token runs two dense GEMMs against them,
             its own adapters' weights applied as a [T, U] mask between the two:
                 h = x @ A_u  ->  h *= mask  ->  y += h @ B_u
             Three ops per layer, no per-token copies of the factors, and a cost that depends on U,
             not on how many adapters are loaded. While the whole stack fits, the layer's
             whole-stack operands (below) replace the per-set copies: one copy for every step,
             however per-token routing moves between steps (per-set copies were rebuilt most steps
             under random top-1 routing: 0.73x merged). Mixed batches, token routing and dense mixing all
             take this path; it is what makes a mixed batch cost about what one adapter costs.
* gather   - few (token, expert) pairs over many distinct adapters, or with autograd: gather each
             pair's factors and run two batched matmuls.
* grouped  - many pairs (training, large prefill over many adapters): loop over the distinct
             experts present, one pair of dense matmuls each on the tokens routed to it.

The learned-weights paths (gate training, AdaMerging) keep autograd: `stacked` and the in-place
updates run only when no gradient is recorded.

The whole stack's factors concatenated over their true ranks (`concat_stack`) are kept by the
layer as buffers while they fit STACK_MAX_COLS and passed in as `stack`: the stacked strategy's
one copy for every step, without the zero padding of mixed ranks. The tokens' weights per column
of it (`Routing.column_mask`) are built once per routing and column layout, not per layer. At
batch 16 under random top-1 routing over 8 rank-8 adapters this path multiplies all 64 columns
for every token, 8x the arithmetic the routing needs (~15% of the step's linear FLOPs instead of
~2%); grouping tokens by adapter with ATen ops costs more in small-op dispatch than it saves on
CPU (padded batched matmuls: 1.05-8x the masked path per layer, benchmarks/lora_kernels.py's
`gather` and `grouped` rows). So on the CPU, decode-sized batches (tokens x rank up to
BGMV_MAX_TOKEN_RANKS, BGMV_MAX_CHOICES choices each, float32) run the compiled C kernel
`kernels.cpu` (punica's BGMV/SGMV) instead: only the routed adapters' rows are read (A from the
layer's stack, B from the whole-stack operand), once per tile of the tokens routed to each, one
call per linear. Without a C compiler it
steps aside and the masked GEMMs run.

Fixed-shape steps pass a `SlotRouting` (per-token slot ids and weights as tensors, never read
back into Python), and take one of two paths with no data-dependent control flow, so
`torch.compile` traces them into the decode step and a CUDA graph can replay them:

* masked   - while the whole stack fits (and more than SLOT_GATHER_MAX token choices): the
             stacked strategy over the whole stack, its [T, S+1]
             mask scattered from the ids and weights on the device. Dense GEMMs only; on CPU the
             gathered path's per-token copies of the factors cost 1x to 4x the base linear per
             layer at 16 tokens (benchmarks/lora_kernels.py), the masked path 0.1x to 1x.
* gathered - each token's factors gathered by slot id and applied with two batched contractions
             (punica's BGMV idea), for stacks too wide to multiply whole and for a single token
             (batch-1 decode: one adapter's factors read, not the whole stack's); the "no
             adapter" slot is all zeros.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from loraswitch.kernels import cpu

GATHER_MAX_PAIRS = 96  # above this many (token, expert) pairs the grouped loop wins on CPU
STACK_MAX_COLS = 256  # U * r_max up to which the stacked strategy runs (beyond: wasted FLOPs on padding)
STACK_CACHE_MAX = 64  # adapter sets remembered per layer
# fixed-shape routings of at most this many (token, choice) pairs take the gathered path even
# while the whole stack fits: a batch-1 step then reads its one adapter's factors, where the
# masked path reads every loaded adapter's (8x the bytes with 8 adapters, on a step bound by
# memory bandwidth)
SLOT_GATHER_MAX = 1
# the compiled CPU kernel (`kernels.cpu`) takes routed batches of up to this many tokens x the
# stack's padded rank, with at most BGMV_MAX_CHOICES choices per token: it does only the routed
# adapters' arithmetic, one call per linear, where the masked path multiplies every loaded
# adapter's columns with MKL. benchmarks/lora_kernels.py (operands hot in cache): with rank 8 at
# 16 tokens (128) the kernel took 0.6-0.8x the masked GEMMs' time, with rank 16 at 16 tokens (256)
# 1.0-1.5x; benchmarks/cpu_kernel_ab.py (inside decode steps): +4.5% decode at batch 4, level at
# batch 16. Larger products (prefills) keep the GEMMs, which also use every thread.
BGMV_MAX_TOKEN_RANKS = 128
BGMV_MAX_CHOICES = 2


@dataclass
class Routing:
    """Per-token sparse adapter weights: token t uses slots `ids[t, :]` with `weights[t, :]`.
    A slot id of -1 means "no adapter" for that choice. Tokens are the flattened batch (row-major
    over [batch, seq]), matching `x.reshape(-1, hidden)` inside a layer."""

    ids: torch.Tensor  # [T, k] long
    weights: torch.Tensor  # [T, k] float
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.ids.dim() == 1:
            self.ids, self.weights = self.ids[:, None], self.weights[:, None]
        if self.ids.shape != self.weights.shape:
            raise ValueError(f"routing ids {tuple(self.ids.shape)} and weights {tuple(self.weights.shape)} differ")

    @classmethod
    def single(cls, n_tokens: int, slot: int) -> Routing:
        return cls(torch.full((n_tokens, 1), slot, dtype=torch.long), torch.ones(n_tokens, 1))

    @property
    def n_tokens(self) -> int:
        return self.ids.shape[0]

    def to(self, device: torch.device) -> Routing:
        """This routing on `device` (itself when already there): policies build routing on the CPU,
        and every layer would otherwise index a GPU stack with CPU tensors."""
        if self.ids.device == device:
            return self
        return Routing(self.ids.to(device), self.weights.to(device))

    def uniform_slot(self) -> int | None:
        """The slot every token uses with weight 1, or None when tokens differ."""
        if "uniform" not in self._cache:
            ids, w = self.ids, self.weights
            first = int(ids[0, 0]) if ids.numel() else -1
            # learnable weights (AdaMerging, gate training) must stay in the graph: no shortcut
            same = not w.requires_grad and ids.shape[1] == 1 and bool((ids == first).all()) and bool((w == 1).all())
            self._cache["uniform"] = first if same else None
        return self._cache["uniform"]

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Active (token, expert) pairs: token index, stack index (slot + 1), weight."""
        if "pairs" not in self._cache:
            keep = self.ids >= 0
            if not self.weights.requires_grad:  # a zero weight still has a gradient when learned
                keep &= self.weights != 0
            tok = keep.nonzero()[:, 0]
            self._cache["pairs"] = (tok, self.ids[keep] + 1, self.weights[keep])
        return self._cache["pairs"]

    def stacked(self) -> tuple[torch.Tensor, tuple[int, ...], torch.Tensor]:
        """The distinct stack indices present (U of them), as a tensor and as a hashable key,
        and the [T, U] mixing weights; computed once per routing, shared by every layer."""
        if "stacked" not in self._cache:
            tok, sid, w = self.pairs()
            uniq = torch.unique(sid)
            mask = torch.zeros(self.n_tokens, len(uniq), dtype=w.dtype, device=w.device)
            mask.index_put_((tok, torch.searchsorted(uniq, sid)), w, accumulate=True)
            self._cache["stacked"] = (uniq, tuple(uniq.tolist()), mask)
        return self._cache["stacked"]

    def column_mask(self, stack: WholeStack, n_stack: int) -> torch.Tensor:
        """Each token's weight per column of the whole-stack operands, [T, C]: the [T, n_stack]
        mixing weights spread over each entry's rank columns. Computed once per routing and
        column layout (`stack.starts`), shared by every layer with that layout (usually all)."""
        key = ("columns", stack.starts)
        if key not in self._cache:
            tok, sid, w = self.pairs()
            mask = torch.zeros(self.n_tokens, n_stack, dtype=w.dtype, device=w.device)
            mask.index_put_((tok, sid), w, accumulate=True)
            self._cache[key] = mask.index_select(1, stack.col_index)
        return self._cache[key]

    def choice_columns(self, stack: WholeStack, n_stack: int) -> tuple[torch.Tensor, ...]:
        """Each (token, choice)'s stack entry, first column and rank in the whole-stack operands
        and weight, [T, k] each (rank 0 for "no adapter" and for slots this layer's stack has no
        columns for): what the compiled CPU kernel reads. Computed once per routing and column
        layout, shared by every layer with that layout."""
        key = ("choices", stack.starts, n_stack)
        if key not in self._cache:
            bounds = list(stack.starts) + [stack.starts[-1]] * max(0, n_stack + 1 - len(stack.starts))
            starts = torch.tensor(bounds, dtype=torch.long)
            ids = self.ids.cpu()
            sid = (ids + 1).clamp(min=0)
            begin = starts[sid]
            rank = torch.where(ids >= 0, starts[sid + 1] - begin, 0)
            self._cache[key] = (sid.contiguous(), begin.contiguous(), rank.contiguous(),
                                self.weights.detach().cpu().float().contiguous())
        return self._cache[key]

    def groups(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Pairs grouped by expert: (stack index, token indices, weights), computed once per
        routing and shared by every layer that uses it."""
        if "groups" not in self._cache:
            tok, sid, w = self.pairs()
            order = torch.argsort(sid, stable=True)
            tok, sid, w = tok[order], sid[order], w[order]
            uniq, counts = torch.unique_consecutive(sid, return_counts=True)
            out, start = [], 0
            for s, c in zip(uniq.tolist(), counts.tolist()):
                out.append((s, tok[start : start + c], w[start : start + c]))
                start += c
            self._cache["groups"] = out
        return self._cache["groups"]


class WholeStack(NamedTuple):
    """The whole stack as two GEMM operands over the adapters' true ranks (`concat_stack`):
    `A` [in, C], `B` [C, out], each column's stack index `col_index` [C], and `starts`: stack
    index i owns columns starts[i]:starts[i+1] (a Python tuple, also the layout's cache key)."""

    A: torch.Tensor
    B: torch.Tensor
    col_index: torch.Tensor
    starts: tuple[int, ...]


@dataclass
class SlotRouting:
    """Per-token routing as fixed-shape tensors that are never inspected on the host: token t
    uses slots `ids[t, :]` (-1: none) with `weights[t, :]`. This is what a compiled decode step
    carries: its values change every step, its shapes and the code path do not."""

    ids: torch.Tensor  # [T, k] long
    weights: torch.Tensor  # [T, k] float

    @property
    def n_tokens(self) -> int:
        return self.ids.shape[0]


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    ranks: list[int],
    routing: Routing,
    cache: dict | None = None,
    stack: WholeStack | None = None,
) -> torch.Tensor:
    """Return `y + sum_e w[t,e] * B_e A_e x_t` for 2-D `x` [T, in] and `y` [T, out].

    `A` [S+1, r_max, in] and `B` [S+1, out, r_max] are the stacked factors (slot s at index s+1,
    scale folded into B), `ranks[i]` the true rank at stack index i. In-place on `y` unless
    autograd is recording (gate training backpropagates through the routing weights). `cache`:
    the layer's store of concatenated factors for the stacked strategy; the layer clears it
    whenever its stacks change. `stack`: the whole stack concatenated (`concat_stack`), when it
    fits STACK_MAX_COLS.
    """
    inplace = not torch.is_grad_enabled()
    whole = stack is not None and 0 < stack.A.shape[1] <= STACK_MAX_COLS
    if isinstance(routing, SlotRouting):  # decided by shapes only: the compiled step traces one path
        if whole and routing.ids.numel() > SLOT_GATHER_MAX:
            return _add_masked(y, x, stack, slot_mask(routing, A.shape[0]).index_select(1, stack.col_index), inplace)
        return _add_gathered(y, x, A, B, routing, inplace)
    uniform = routing.uniform_slot()
    if uniform is not None:
        if uniform < 0 or ranks[uniform + 1] == 0:
            return y
        r = ranks[uniform + 1]
        if inplace and cache is not None:  # decode-time fast path: two GEMMs on cached contiguous factors
            A_t, B_t = _cached(cache, ("uniform", uniform), x, _one_adapter, A, B, uniform + 1, r)
            return y.addmm_(x @ A_t, B_t)
        delta = (x @ A[uniform + 1, :r].T) @ B[uniform + 1, :, :r].T
        return y.add_(delta) if inplace else y + delta
    tok, sid, w = routing.pairs()
    if tok.numel() == 0:
        return y
    if inplace and not w.requires_grad:
        if whole:  # every loaded slot fits: the layer's one whole-stack copy for every step
            if _bgmv(y, x, A, stack, routing):
                return y
            return _add_masked(y, x, stack, routing.column_mask(stack, A.shape[0]), inplace)
        uniq, key, mask = routing.stacked()
        if len(key) * A.shape[1] <= STACK_MAX_COLS:
            return _add_stacked(y, x, A, B, uniq, key, mask, cache)
    if tok.numel() <= GATHER_MAX_PAIRS:
        xs = x if tok.numel() == x.shape[0] and routing.ids.shape[1] == 1 else x.index_select(0, tok)
        h = torch.bmm(A.index_select(0, sid), xs.unsqueeze(-1))  # [P, r_max, 1]
        delta = torch.bmm(B.index_select(0, sid), h).squeeze(-1) * w.unsqueeze(-1).to(y.dtype)
        return y.index_add_(0, tok, delta) if inplace else y.index_add(0, tok, delta)
    for s, idx, wg in routing.groups():
        r = ranks[s]
        if r == 0:
            continue  # this adapter does not target this module
        delta = (x.index_select(0, idx) @ A[s, :r].T) @ B[s, :, :r].T
        delta = delta * wg.unsqueeze(-1).to(y.dtype)
        y = y.index_add_(0, idx, delta) if inplace else y.index_add(0, idx, delta)
    return y


def _bgmv(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, stack: WholeStack, routing: Routing) -> bool:
    """The compiled CPU kernel (`kernels.cpu`) for decode-sized batches with at most
    BGMV_MAX_CHOICES choices per token: only the routed adapters' rows (A from the layer's stack,
    B from the whole-stack operand), one call. False when it does not apply (then the masked
    path runs)."""
    if (x.shape[0] * A.shape[1] > BGMV_MAX_TOKEN_RANKS or routing.ids.shape[1] > BGMV_MAX_CHOICES
            or not cpu.supports(y, x, A, stack.B)):
        return False
    entry, start, rank, weight = routing.choice_columns(stack, A.shape[0])
    return cpu.bgmv_(y, x, A, stack.B, entry, start, rank, weight)


def concat_stack(A: torch.Tensor, B: torch.Tensor, ranks: list[int]) -> WholeStack:
    """The whole stack as two GEMM operands over the adapters' true ranks, [in, C] and [C, out]
    with C = sum of ranks (no zero padding, no "no adapter" entry: every column is read every
    step, so padding would cost bandwidth), each column's stack index [C], and where each stack
    index's columns start; empty when C is above STACK_MAX_COLS (then the per-set and gathered
    paths run)."""
    starts = (0, *itertools.accumulate(r if i > 0 else 0 for i, r in enumerate(ranks)))
    cols = [(i, r) for i, r in enumerate(ranks) if i > 0 and r > 0]
    total = sum(r for _, r in cols)
    if not cols or total > STACK_MAX_COLS:
        return WholeStack(A.new_zeros(A.shape[2], 0), B.new_zeros(0, B.shape[1]),
                          torch.zeros(0, dtype=torch.long, device=A.device), starts)
    A_all = torch.cat([A[i, :r] for i, r in cols]).T.contiguous()
    B_all = torch.cat([B[i, :, :r] for i, r in cols], dim=1).T.contiguous()
    col_index = torch.tensor([i for i, r in cols for _ in range(r)], dtype=torch.long, device=A.device)
    return WholeStack(A_all, B_all, col_index, starts)


def slot_mask(routing: SlotRouting, n_stack: int) -> torch.Tensor:
    """[T, n_stack] mixing weights of a fixed-shape routing, scattered on the device (slot -1
    lands on the all-zero stack entry 0)."""
    w = routing.weights
    return torch.zeros(routing.n_tokens, n_stack, dtype=w.dtype, device=w.device).scatter_add(1, routing.ids + 1, w)


def _add_masked(y: torch.Tensor, x: torch.Tensor, stack: WholeStack, columns: torch.Tensor,
                inplace: bool) -> torch.Tensor:
    """y += ((x @ A_all) * columns) @ B_all over the whole stack: two dense GEMMs and a scale;
    `columns` [T, C] holds each token's weight per rank column (its stack entry's weight)."""
    h = x @ stack.A
    h = h.mul_(columns.to(h.dtype)) if inplace else h * columns.to(h.dtype)
    return y.addmm_(h, stack.B) if inplace else torch.addmm(y, h, stack.B)


def _add_gathered(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, routing: SlotRouting,
                  inplace: bool) -> torch.Tensor:
    """The gathered strategy (module docstring): every token's k slots' factors gathered by id,
    `y[t] += sum_j w[t,j] * B[id] (A[id] x[t])`; slot -1 maps to the all-zero stack entry 0."""
    idx = routing.ids + 1  # [T, k]
    h = torch.einsum("tkri,ti->tkr", A[idx], x) * routing.weights.to(x.dtype).unsqueeze(-1)
    delta = torch.einsum("tkor,tkr->to", B[idx], h)
    return y.add_(delta) if inplace else y + delta


def _add_stacked(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, uniq: torch.Tensor,
                 key: tuple, mask: torch.Tensor, cache: dict | None) -> torch.Tensor:
    """The stacked strategy over the adapter set present (module docstring): y += ((x @ A_u) *
    mask) @ B_u, in place, the set's concatenated factors cached by the layer per set."""
    A_u, B_u = _cached(cache, key, x, _adapter_set, A, B, uniq)
    h = x @ A_u
    h.view(x.shape[0], mask.shape[1], -1).mul_(mask.to(h.dtype).unsqueeze(-1))
    return y.addmm_(h, B_u)


def _one_adapter(A: torch.Tensor, B: torch.Tensor, i: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack entry i's factors as contiguous GEMM operands, [in, r] and [r, out] (uniform path)."""
    return A[i, :r].T.contiguous(), B[i, :, :r].T.contiguous()


def _adapter_set(A: torch.Tensor, B: torch.Tensor, uniq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stack entries `uniq` concatenated, [in, U*r] and [U*r, out] (per-set stacked path)."""
    A_s, B_s = A.index_select(0, uniq), B.index_select(0, uniq)
    return A_s.reshape(-1, A.shape[2]).T.contiguous(), B_s.transpose(1, 2).reshape(-1, B.shape[1]).contiguous()


def _cached(cache: dict | None, key: tuple, x: torch.Tensor, build: Callable[..., tuple[torch.Tensor, torch.Tensor]],
            *args) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors derived from the layer's stacks, `build(*args)` once per key and kept in the
    layer's cache (which the layer clears whenever its stacks change), in `x`'s dtype and device.
    The builder and its arguments are passed, not a closure: the hit runs for every LoRA'd linear
    of every decode step, and building a closure there was a measurable share of it."""
    factors = cache.get(key) if cache is not None else None
    if factors is None or factors[0].device != x.device or factors[0].dtype != x.dtype:
        factors = tuple(t.to(x.dtype) for t in build(*args))
        if cache is not None:
            if len(cache) >= STACK_CACHE_MAX:
                cache.clear()
            cache[key] = factors
    return factors  # type: ignore[return-value]
