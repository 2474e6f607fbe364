"""Arrow (Ostapenko et al. 2024): zero-shot routing from the adapters' own weights.

For every targeted layer, an adapter's prototype is the top right singular vector of its update
`B @ A`: the input direction the adapter reacts to most. A token goes to the top-k adapters by
|cosine| between its layer input and the prototypes, weighted by a softmax. No data and no
training: a newly loaded adapter is routable as soon as its prototypes are computed.

The SVD never materialises `B @ A` ([out, in]): with `A^T = Q R` (thin QR, Q [in, r]),
`B A = (B R^T) Q^T`, so the right singular vectors are `Q` times those of the small `B R^T`.
"""

from __future__ import annotations

import torch

from loraswitch.engine import Engine
from loraswitch.library import LoraModule
from loraswitch.routing.token import TokenRouter


def top_right_singular_vector(module: LoraModule) -> torch.Tensor:
    """Unit vector v [in] maximising ||B A v||, computed in O((in + out) r^2)."""
    Q, R = torch.linalg.qr(module.A.double().T)  # A^T = Q R
    _, _, Vh = torch.linalg.svd(module.B.double() @ R.T, full_matrices=False)
    return (Q @ Vh[0]).to(module.A.dtype)


class ArrowRouter(TokenRouter):
    name = "arrow"

    def __init__(self, engine: Engine, top_k: int = 1, temperature: float = 0.05):
        super().__init__(engine, top_k, temperature)
        self.prototypes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (P [n, in], slots [n])
        self.version: tuple[int, int] = (-1, -1)
        self.refresh()

    def refresh(self) -> None:
        """(Re)compute prototypes for the adapters in the layers now; cheap, run on every library
        change and whenever adapters are paged in or out (a token router picks among those)."""
        by_key: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for name, slot in self.engine.slots.items():
            adapter = self.engine.adapters[name]
            for key, module in adapter.modules.items():
                by_key.setdefault(key, []).append((slot, top_right_singular_vector(module)))
        device = self.engine.device  # where the layers' inputs will be
        self.prototypes = {
            key: (torch.stack([v.float() for _, v in items]).to(device), torch.tensor([s for s, _ in items], dtype=torch.long, device=device))
            for key, items in by_key.items()
        }
        self.version = self.engine.layout

    def scores(self, key: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.version != self.engine.layout:
            self.refresh()
        entry = self.prototypes.get(key)
        if entry is None:
            return None
        P, slots = entry
        x = x.reshape(-1, x.shape[-1]).float()  # a bf16 / fp16 model scores in fp32
        cos = (x @ P.T).abs() / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        return cos, slots
