"""Merge methods: one small function per method, behind a registry (cf. mergekit's merge_methods).

Every method has the form `fn(deltas, weights, **params) -> Tensor`: it receives the dense
updates `dW_e = s_e * B_e @ A_e` of ONE targeted module (one per adapter, zeros where an adapter
does not target the module) and returns that module's merged update. Methods work on the dense
updates on purpose: trimming, sign election, random drops and competition scores are defined on
the weights a model actually adds to W. Applying them to A and B separately (what PEFT's and
LoRAX's `ties`/`dare` do) prunes factors whose product is a different matrix, and the result is
not the merge the papers describe.

The global task-arithmetic scaling `lambda` is applied by the orchestration (`merge.py`), not
here, so that each function is exactly its paper's combination rule and can be checked by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

MergeFn = Callable[..., Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its function, its parameters with defaults, and two facts the
    orchestration needs (does it draw random numbers; does it keep the sum of low-rank updates
    low-rank, so an exact export needs only the summed input ranks)."""

    name: str
    fn: MergeFn
    params: dict[str, Any] = field(default_factory=dict)
    random: bool = False
    low_rank: bool = False
    summary: str = ""


METHODS: dict[str, MergeMethod] = {}


def register(name: str, *, random: bool = False, low_rank: bool = False, **defaults: Any) -> Callable[[MergeFn], MergeFn]:
    """Register `fn` as merge method `name` with parameter `defaults` (the YAML `parameters`)."""

    def deco(fn: MergeFn) -> MergeFn:
        doc = (fn.__doc__ or "").strip().splitlines()
        METHODS[name] = MergeMethod(name, fn, dict(defaults), random, low_rank, doc[0] if doc else "")
        return fn

    return deco


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise KeyError(f"unknown merge method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]


# ---------------------------------------------------------------------------- building blocks


def _weighted(deltas: list[Tensor], weights: list[float]) -> Tensor:
    """Stack the per-adapter updates, each multiplied by its weight: [N, *shape]."""
    if not deltas:
        raise ValueError("nothing to merge: no updates given")
    if len(deltas) != len(weights):
        raise ValueError(f"{len(deltas)} updates but {len(weights)} weights")
    stacked = torch.stack([d.float() for d in deltas])
    w = torch.tensor(weights, dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    return stacked * w


def n_keep(density: float, n: int) -> int:
    """How many of `n` entries a `density` keeps: rounded half up, at least one when density > 0
    (a tiny module must not vanish just because 0.2 * 3 rounds to 0)."""
    if density <= 0:
        return 0
    return min(n, max(1, int(density * n + 0.5)))


def trim_top_k(delta: Tensor, density: float) -> Tensor:
    """TIES step 1: keep the `density` fraction of entries with the largest magnitude, zero the
    rest. Exactly `n_keep` entries survive, so ties at the threshold cannot keep more."""
    k = n_keep(density, delta.numel())
    flat = delta.flatten()
    out = torch.zeros_like(flat)
    if k:
        idx = flat.abs().topk(k).indices
        out[idx] = flat[idx]
    return out.view_as(delta)


def elect_sign(stacked: Tensor) -> Tensor:
    """TIES step 2: per entry, the sign with the larger total mass, i.e. sign(sum over tasks).
    An exact tie elects 0, and then no task agrees and the entry stays 0."""
    return stacked.sum(0).sign()


def disjoint_mean(stacked: Tensor, weights: list[float], sign: Tensor) -> Tensor:
    """TIES step 3: per entry, the mean over the tasks whose (weighted, trimmed) value is non-zero
    and has the elected sign; tasks that disagree or were trimmed do not dilute the mean.

    `stacked` already carries the weights; dividing by the agreeing tasks' |weight| makes the
    result the plain disjoint mean of the paper when all weights are 1, and a weighted mean
    otherwise (|w| so that a negative weight, i.e. task negation, still averages sensibly).
    """
    agree = (stacked.sign() == sign.unsqueeze(0)) & (stacked != 0)
    w = torch.tensor(weights, dtype=stacked.dtype).abs().view(-1, *([1] * (stacked.dim() - 1)))
    num = (stacked * agree).sum(0)
    den = (w * agree).sum(0)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))


def dare_drop(delta: Tensor, keep: Tensor, density: float) -> Tensor:
    """DARE: zero the dropped entries and rescale the kept ones by 1/(1-p) = 1/density, which
    keeps the expected update unchanged. `keep` is the boolean mask of kept entries."""
    if density <= 0:
        return torch.zeros_like(delta)
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def dare_mask(shape: torch.Size, density: float, generator: torch.Generator | None) -> Tensor:
    """Keep each entry independently with probability `density` (= 1 - p), from `generator`."""
    return torch.rand(shape, generator=generator) < density


def _minmax(x: Tensor) -> Tensor:
    """Min-max normalise each row of a [N, D] tensor to [0, 1] (a constant row becomes zeros)."""
    lo = x.min(dim=-1, keepdim=True).values
    hi = x.max(dim=-1, keepdim=True).values
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-30), torch.zeros_like(x))


def pcb_scores(stacked: Tensor) -> Tensor:
    """PCB-Merging's balancing matrix beta [N, D] for flattened task vectors `stacked` [N, D]:

    intra_i = softmax(N * Norm(tau_i * tau_i))           -- self-awareness: how big an entry is
                                                            within its own task, sharper with more tasks
    inter_i = sum_j softmax(Norm(tau_i * tau_j))          -- cross-awareness: how much the other tasks
                                                            agree with it (same sign, large product)
    beta_i  = intra_i * inter_i

    (Du et al. 2024, eqs. for intra-/inter-balancing; Norm is min-max over the entries of one
    task's tensor, softmax runs over those entries.)
    """
    n = stacked.shape[0]
    intra = torch.softmax(n * _minmax(stacked * stacked), dim=-1)
    inter = torch.zeros_like(stacked)
    for j in range(n):
        inter += torch.softmax(_minmax(stacked * stacked[j : j + 1]), dim=-1)
    return intra * inter


# ---------------------------------------------------------------------------- the methods


@register("linear", low_rank=True)
def linear(deltas: list[Tensor], weights: list[float]) -> Tensor:
    """Task arithmetic: sum_e w_e * dW_e (no normalisation; scale the result with `lambda`)."""
    return _weighted(deltas, weights).sum(0)


@register("ties", density=0.2)
def ties(deltas: list[Tensor], weights: list[float], density: float = 0.2) -> Tensor:
    """TIES-Merging (Yadav et al. 2023): trim each update to its top-`density` magnitudes, elect
    the sign with the larger summed mass, take the disjoint mean of the agreeing entries."""
    trimmed = torch.stack([trim_top_k(d, density) for d in _weighted(deltas, weights)])
    return disjoint_mean(trimmed, weights, elect_sign(trimmed))


def _dare_all(deltas: list[Tensor], weights: list[float], density: float, generator: torch.Generator | None) -> Tensor:
    """DARE every weighted update, masks drawn in adapter order from one generator."""
    stacked = _weighted(deltas, weights)
    return torch.stack([dare_drop(d, dare_mask(d.shape, density, generator), density) for d in stacked])


@register("dare_linear", random=True, density=0.5)
def dare_linear(deltas: list[Tensor], weights: list[float], density: float = 0.5,
                generator: torch.Generator | None = None) -> Tensor:
    """DARE (Yu et al. 2024) then task arithmetic: drop each entry with p = 1 - density,
    rescale survivors by 1/density, sum."""
    return _dare_all(deltas, weights, density, generator).sum(0)


@register("dare_ties", random=True, density=0.5)
def dare_ties(deltas: list[Tensor], weights: list[float], density: float = 0.5,
              generator: torch.Generator | None = None) -> Tensor:
    """DARE as the sparsification step of TIES (instead of the magnitude trim), then TIES sign
    election and disjoint mean."""
    dropped = _dare_all(deltas, weights, density, generator)
    return disjoint_mean(dropped, weights, elect_sign(dropped))


@register("pcb", density=0.2)
def pcb(deltas: list[Tensor], weights: list[float], density: float = 0.2) -> Tensor:
    """PCB-Merging (Du et al. 2024): balancing scores beta from intra- and inter-balancing, keep
    the top-`density` scores of each task, merge as sum(beta_hat * tau) / sum(beta_hat).

    One deliberate detail: entries that are exactly zero in a task (a module the adapter does not
    target, or a DARE drop) get beta_hat = 0. They add nothing to the numerator, and letting them
    weigh in the denominator would only shrink the other tasks' values, which is the same reason
    TIES's disjoint mean ignores them.
    """
    stacked = _weighted(deltas, weights)
    shape = stacked.shape[1:]
    flat = stacked.flatten(1)
    beta = pcb_scores(flat)
    k = n_keep(density, flat.shape[1])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if k:
        keep.scatter_(1, beta.topk(k, dim=1).indices, True)
    beta_hat = beta * (keep & (flat != 0))
    den = beta_hat.sum(0)
    merged = torch.where(den > 0, (beta_hat * flat).sum(0) / den.clamp_min(1e-30), torch.zeros_like(den))
    return merged.view(shape)
