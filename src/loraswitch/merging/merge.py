"""Orchestration: from validated adapters to one merged dense update per targeted module.

The adapters rarely target the same modules (the demo library mixes attention-only and
all-linear adapters), so the merge runs over the UNION of their target modules, and an adapter
that does not target a module contributes a zero update there; that is exactly what the adapter
does to that module when it runs alone, so no method has to special-case it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from loraswitch.base import Base
from loraswitch.library import Adapter, read_adapter
from loraswitch.merging.adamerging import adamerge
from loraswitch.merging.config import ADAMERGING, MergeConfig
from loraswitch.merging.deltas import module_deltas, module_union
from loraswitch.merging.methods import get_method


@dataclass
class MergeResult:
    """The merged updates (float32, [out, in] per module name) and what produced them."""

    deltas: dict[str, Tensor]
    method: str
    adapters: list[Adapter]
    weights: list[float]
    parameters: dict[str, Any]
    exact_rank: dict[str, int] = field(default_factory=dict)  # smallest rank that represents each update exactly
    adamerging: dict[str, Any] | None = None  # learned coefficients and entropy curve

    @property
    def modules(self) -> list[str]:
        return list(self.deltas)


def module_seed(seed: int, module: str) -> int:
    """A seed per (run seed, module): random methods draw independent masks per module, and a
    module's masks do not change when other modules are added to or removed from the merge."""
    return (seed * 1_000_003 + zlib.crc32(module.encode())) % (2**63 - 1)


def exact_ranks(adapters: list[Adapter], modules: list[str], low_rank: bool) -> dict[str, int]:
    """The rank at which an SVD export loses nothing: the summed input ranks for methods that keep
    sums of low-rank updates low-rank (linear, AdaMerging), else the full dimension (elementwise
    trims, drops and sign elections make the merged matrix full-rank in general)."""
    out = {}
    for key in modules:
        mods = [a.modules[key] for a in adapters if key in a.modules]
        full = min(mods[0].B.shape[0], mods[0].A.shape[1])
        out[key] = min(full, sum(m.rank for m in mods)) if low_rank else full
    return out


def merge_deltas(
    adapters: list[Adapter],
    weights: list[float],
    method: str,
    params: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Merge the adapters' updates module by module with a registered per-module method; the
    result is multiplied by `lambda` (task-arithmetic scaling, default 1)."""
    spec = get_method(method)
    params = dict(params or {})
    lam = float(params.pop("lambda", 1.0))
    seed = int(params.pop("seed", 0))
    kwargs = {k: v for k, v in params.items() if k in spec.params}
    out: dict[str, Tensor] = {}
    for module in tqdm(module_union(adapters), desc=f"merge ({method})", unit="module", disable=not progress):
        extra = {"generator": torch.Generator().manual_seed(module_seed(seed, module))} if spec.random else {}
        out[module] = lam * spec.fn(module_deltas(adapters, module), list(weights), **kwargs, **extra)
    return out


def load_adapters(cfg: MergeConfig, base: Base) -> list[Adapter]:
    """Read and validate the configured adapters against `base` (raises AdapterError)."""
    return [read_adapter(spec.path, base.model, name=spec.name, base_name=base.name) for spec in cfg.adapters]


def run_merge(cfg: MergeConfig, base: Base, adapters: list[Adapter] | None = None, progress: bool = True) -> MergeResult:
    """Run the configured merge on `base`: per-module methods directly, AdaMerging by learning its
    coefficients through the engine first (which leaves `base.model` as it found it)."""
    adapters = adapters if adapters is not None else load_adapters(cfg, base)
    params = dict(cfg.parameters)
    modules = module_union(adapters)
    if cfg.method == ADAMERGING:
        result = adamerge(base, adapters, cfg.weights, params, progress=progress)
        return MergeResult(
            deltas=result.merged_deltas(adapters),
            method=cfg.method,
            adapters=adapters,
            weights=cfg.weights,
            parameters=params,
            exact_rank=exact_ranks(adapters, modules, low_rank=True),
            adamerging=result.to_dict(),
        )
    spec = get_method(cfg.method)
    deltas = merge_deltas(adapters, cfg.weights, cfg.method, params, progress=progress)
    return MergeResult(deltas, cfg.method, adapters, cfg.weights, params, exact_ranks(adapters, modules, spec.low_rank))
