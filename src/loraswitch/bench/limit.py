"""The hardware limit of batch-1 decode: how fast this machine can run every weight matrix of the
model once as a matrix-vector product, which is what one decoded token must do at least.

At batch 1 a decode step reads each weight once and does two FLOPs per weight, so it is bound
by memory bandwidth, not arithmetic. The sweep times the model's own weights (every linear in
model order, then the output head), the same kernels a step would call (`F.linear` on one row),
so caches and prefetching behave as they would in a step. From it: GB/s per weight shape, and
the implied ceiling, tokens/s = 1 / (time for all matvecs of one token). A decode step at that
rate would spend no time on attention, norms, activations, sampling or the framework.
"""

from __future__ import annotations

import time
from collections import defaultdict
from statistics import median

import torch
from torch import nn
from torch.nn import functional as F


def _weights(model: nn.Module) -> list[torch.Tensor]:
    """Every linear weight in module order, plus the output head (tied to the embedding or not)."""
    out = [m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear) and not name.endswith("lm_head")]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        out.append(head.weight)
    return out


@torch.inference_mode()
def matvec_limit(model: nn.Module, repeats: int = 7, device: torch.device | None = None) -> dict:
    """Median over `repeats` sweeps (after one warm-up) of the time to run every weight of
    `model` once on one input row; per shape GB/s, and the implied tokens/s ceiling."""
    weights = _weights(model)
    device = device or weights[0].device
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype, device=device) for w in weights}
    per_shape: dict[tuple[int, int], list[float]] = defaultdict(list)
    sweeps: list[float] = []
    for rep in range(repeats + 1):
        times: dict[tuple[int, int], float] = defaultdict(float)
        _sync(device)
        t_all = time.perf_counter()
        for w in weights:
            t0 = time.perf_counter()
            F.linear(xs[w.shape[1]], w)
            _sync(device)
            times[tuple(w.shape)] += time.perf_counter() - t0
        total = time.perf_counter() - t_all
        if rep:  # the first sweep warms caches and kernels
            sweeps.append(total)
            for shape, t in times.items():
                per_shape[shape].append(t)
    count: dict[tuple[int, int], int] = defaultdict(int)
    for w in weights:
        count[tuple(w.shape)] += 1
    elem = weights[0].element_size()
    shapes = []
    for shape, ts in per_shape.items():
        nbytes = count[shape] * shape[0] * shape[1] * elem
        shapes.append({"shape": list(shape), "count": count[shape], "mb": round(nbytes / 2**20, 1),
                       "gb_s": round(nbytes / median(ts) / 1e9, 1)})
    total_bytes = sum(w.numel() * elem for w in weights)
    sweep = median(sweeps)
    return {"weights_mb": round(total_bytes / 2**20, 1), "sweep_ms": round(1e3 * sweep, 2),
            "gb_s": round(total_bytes / sweep / 1e9, 1), "tokens_per_s": round(1 / sweep, 1),
            "spread": round((max(sweeps) - min(sweeps)) / sweep, 3), "shapes": shapes}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
