"""Zero-shot sequence scores from an adapter's own weights: how strongly a prompt's pooled hidden
state excites the input side of the adapter, as a quadratic form `h^T M h / ||h||^2`.

Why from the pooled routing feature and not per token (Arrow): the selector's feature pass
already produces the residual stream at the feature layer (mean over the prompt and the last
token), and the selector file keeps a reservoir of those features for the classes it knows. A
score that is a function of that feature alone is therefore (1) free at decision time (no second
pass, no per-layer hooks) and (2) calibratable against the reservoir: the threshold is set so
that only a small share of the known classes' prompts would be claimed by the new adapter.

Every module whose input is the residual stream (q/k/v after `input_layernorm`, gate/up after
`post_attention_layernorm`) contributes, with the pooled state standing in for its input at every
layer (the residual stream drifts slowly) and the layer's norm gain applied. Variants measured
(benchmarks/growing_library.py, docs/routing.md):

* `arrow`: the top right singular vector of `B A` per module (Arrow's prototype), pooled;
* `subspace`: the whole row space of `A` (`||Q^T x||^2`, `Q` an orthonormal basis of `A^T`);
* `energy`: the relative energy `||s B A x||^2 / ||W x||^2`, with `||W x||^2` taken at the
  module's average gain `||W||_F^2 / in`.

M is [d, d]; it is kept as `U` [d, k] (top-k eigenvectors scaled by sqrt of their eigenvalues),
so scoring N prompts against M adapters is one [N, d] x [d, M k] product.
"""

from __future__ import annotations

import torch

from loraswitch.engine import Engine
from loraswitch.library import Adapter

VARIANTS = ("arrow", "subspace", "energy")
DEFAULT_VARIANT = "arrow"  # measured best (docs/routing.md)
RANK = 32  # eigen-directions kept per adapter
_NORMS = {"self_attn": "input_layernorm", "mlp": "post_attention_layernorm"}
_RESIDUAL_INPUTS = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}


def _gain(engine: Engine, key: str) -> torch.Tensor | None:
    """The norm weight applied to the residual stream before module `key`, or None when the
    module's input is not the residual stream (o_proj, down_proj)."""
    parent, _, leaf = key.rpartition(".")
    block, _, group = parent.rpartition(".")
    if leaf not in _RESIDUAL_INPUTS or group not in _NORMS:
        return None
    norm = getattr(engine.model.get_submodule(block), _NORMS[group], None)
    weight = getattr(norm, "weight", None)
    return None if weight is None else weight.detach().double()


_GAINS: dict[int, torch.Tensor] = {}  # id(base weight) -> ||W||_F^2 / in (base weights never change)


def _mean_gain(weight: torch.Tensor) -> torch.Tensor:
    """||W||_F^2 / in: the module's average energy gain (for `energy`), once per base weight."""
    if id(weight) not in _GAINS:
        _GAINS[id(weight)] = (torch.linalg.vector_norm(weight.float()).double() ** 2) / weight.shape[1]
    return _GAINS[id(weight)]


def _factors(variant: str, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, weight_sq: torch.Tensor) -> torch.Tensor:
    """K [n, in, c] with M = K K^T for n modules of one shape at once (A [n, r, in], B [n, out, r];
    before the norm gain). Batched: one LAPACK call per shape instead of one per module."""
    Q, R = torch.linalg.qr(A.transpose(1, 2))  # A^T = Q R
    if variant == "subspace":
        return Q
    _, S, Vh = torch.linalg.svd(B @ R.transpose(1, 2), full_matrices=False)  # B A = (B R^T) Q^T
    V = Q @ Vh.transpose(1, 2)
    if variant == "arrow":
        return V[:, :, :1]
    # energy: ||s B A x||^2 = sum_i (s S_i v_i^T x)^2, over the module's average gain ||W||_F^2 / in
    return V * (scale[:, None, None] * S[:, None, :] / weight_sq.sqrt()[:, None, None])


@torch.no_grad()
def adapter_factor(engine: Engine, adapter: Adapter, variant: str = DEFAULT_VARIANT, rank: int = RANK) -> torch.Tensor | None:
    """U [d, <=rank] with `||U^T h||^2 ~ h^T M h` for `adapter`, or None when none of its modules
    reads the residual stream (it cannot be scored zero-shot from the routing feature)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown zero-shot variant {variant!r}; choose one of {VARIANTS}")
    groups: dict[tuple, list[tuple[torch.Tensor, object, torch.Tensor]]] = {}
    for key, module in adapter.modules.items():
        gain = _gain(engine, key)
        if gain is not None:
            weight = engine.layers[key].base.weight
            groups.setdefault((tuple(module.A.shape), tuple(module.B.shape)), []).append((gain, module, weight))
    if not groups:
        return None
    parts = []
    for items in groups.values():
        A = torch.stack([m.A for _, m, _ in items]).double()
        B = torch.stack([m.B for _, m, _ in items]).double()
        scale = torch.tensor([m.scale for _, m, _ in items], dtype=torch.float64)
        weight_sq = (torch.stack([_mean_gain(w) for _, _, w in items]) if variant == "energy"
                     else torch.ones(len(items), dtype=torch.float64))
        K = _factors(variant, A, B, scale, weight_sq) * torch.stack([g for g, _, _ in items])[:, :, None]
        parts.append(K.transpose(0, 1).reshape(K.shape[1], -1))  # [in, n c]
    n_modules = sum(len(items) for items in groups.values())
    K = torch.cat(parts, 1) / n_modules ** 0.5  # the mean over modules
    U, S, _ = torch.linalg.svd(K, full_matrices=False)
    k = min(rank, S.shape[0])
    return (U[:, :k] * S[:k]).float()


def split_feature(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean-pooled, last-token) halves of the routing feature (`features.prompt_features`)."""
    d = feats.shape[1] // 2
    return feats[:, :d], feats[:, d:]


def quadratic_scores(feats: torch.Tensor, U: torch.Tensor, k: int) -> torch.Tensor:
    """[N, M] scores of raw features against M stacked factors U [d, M k]: the energy of the
    mean-pooled and of the last-token state, each relative to its own norm, summed."""
    total = 0
    for h in split_feature(feats):
        e = (h @ U).pow(2).reshape(h.shape[0], -1, k).sum(-1)
        total = total + e / h.pow(2).sum(-1, keepdim=True).clamp(min=1e-12)
    return total


def stack(factors: list[torch.Tensor], k: int = RANK) -> torch.Tensor:
    """Factors of possibly fewer than k columns, zero-padded to k and stacked into [d, M k]."""
    d = factors[0].shape[0]
    return torch.cat([torch.cat([f, f.new_zeros(d, k - f.shape[1])], 1) for f in factors], 1)
