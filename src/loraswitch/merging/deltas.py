"""The exact dense updates of a set of adapters, module by module: what every merge method and
AdaMerging combine.

The adapters rarely target the same modules (the demo library mixes attention-only and
all-linear adapters), so merges run over the UNION of their target modules, and an adapter that
does not target a module contributes a zero update there: exactly what it does to that module
when it runs alone, so no method has to special-case it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from loraswitch.library import Adapter


def module_union(adapters: list[Adapter]) -> list[str]:
    """Every module targeted by at least one adapter, sorted."""
    return sorted({key for a in adapters for key in a.modules})


def module_deltas(adapters: list[Adapter], module: str) -> list[Tensor]:
    """Each adapter's exact update `s * B @ A` on `module` in float32, zeros where it has none."""
    present = [a.modules[module] for a in adapters if module in a.modules]
    if not present:
        raise KeyError(f"no adapter targets {module!r}")
    shape = (present[0].B.shape[0], present[0].A.shape[1])
    out = []
    for a in adapters:
        m = a.modules.get(module)
        out.append(m.delta().float() if m is not None else torch.zeros(shape))
    return out
