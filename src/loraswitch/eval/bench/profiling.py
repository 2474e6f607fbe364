"""Where decode time goes (torch profiler), and a proposed alternative mixed-batch kernel timed
beside the product's (`--proto`)."""

from __future__ import annotations

import torch

from loraswitch.engine import Engine
from loraswitch.eval.bench.config import BenchConfig
from loraswitch.eval.bench.fixtures import RandomTokenPolicy
from loraswitch.eval.bench.measure import ls_generate
from loraswitch.generate import FixedPolicy


# ---------------------------------------------------------------------------- a kernel proposal
class ProtoKernel:
    """A PROPOSED alternative to `kernels.add_lora` for mixed batches, measured side by side
    (`--proto`), never used by the product: per layer, the factors of the U distinct adapters in
    the batch are concatenated once ([U*r, in] and [out, U*r], cached while the batch's adapter
    set and the stacks are unchanged), and every token runs two dense GEMMs against them with a
    [T, U] weight mask computed once per Routing and shared by all layers:

        h = x @ A_u.T  ->  h *= mask (per token: its adapters' weights, 0 elsewhere)  ->  y += h @ B_u.T

    Three ops per layer instead of gather + two bmm + scale + index_add, no per-token copies of the
    factors, cost independent of how many adapters are loaded (only U matters)."""

    def __init__(self, max_unique: int = 16):
        import loraswitch.layers as layers_mod

        self.layers_mod = layers_mod
        self.original = layers_mod.add_lora
        self.max_unique = max_unique
        self.cache: dict = {}

    def __enter__(self) -> ProtoKernel:
        self.layers_mod.add_lora = self.add_lora
        return self

    def __exit__(self, *exc) -> None:
        self.layers_mod.add_lora = self.original
        self.cache.clear()

    def add_lora(self, y, x, A, B, ranks, routing):
        if torch.is_grad_enabled() or routing.uniform_slot() is not None:
            return self.original(y, x, A, B, ranks, routing)
        c = routing._cache
        if "proto" not in c:
            tok, sid, w = routing.pairs()
            uniq = torch.unique(sid)
            col = torch.searchsorted(uniq, sid)
            mask = torch.zeros(routing.n_tokens, len(uniq), dtype=w.dtype, device=w.device)
            mask.index_put_((tok, col), w, accumulate=True)
            c["proto"] = (uniq, tuple(uniq.tolist()), mask)
        uniq, key_slots, mask = c["proto"]
        if len(key_slots) > self.max_unique or len(key_slots) == 0:
            return self.original(y, x, A, B, ranks, routing)
        key = (A.data_ptr(), A._version, B._version, key_slots)
        factors = self.cache.get(key)
        if factors is None:
            if len(self.cache) > 4096:
                self.cache.clear()
            A_u = A.index_select(0, uniq).reshape(-1, A.shape[2])  # [U*r, in]
            B_u = B.index_select(0, uniq).permute(1, 0, 2).reshape(B.shape[1], -1)  # [out, U*r]
            factors = self.cache[key] = (A_u.T.contiguous(), B_u.T.contiguous())
        At, Bt = factors
        r = A.shape[1]
        h = (x @ At).view(x.shape[0], -1, r).mul_(mask.to(x.dtype).unsqueeze(-1)).view(x.shape[0], -1)
        return y.addmm_(h, Bt)


# ---------------------------------------------------------------------------- profiling
def profile_kernels(engine: Engine, ids: torch.Tensor, slots: list[int], cfg: BenchConfig, device: torch.device) -> dict:
    """Where decode time goes: torch profiler over `generate` for explicit, mixed and token-routed
    batches (top ops by self time), plus the share of time inside the LoRA kernel (`add_lora`)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import loraswitch.layers as layers_mod

    original = layers_mod.add_lora

    def traced(*args, **kwargs):
        with record_function("loraswitch.add_lora"):
            return original(*args, **kwargs)

    b = ids.shape[0]
    policies = {
        "ls_explicit": lambda: FixedPolicy([([slots[0]], [1.0])] * b),
        "ls_mixed": lambda: FixedPolicy([([slots[i % len(slots)]], [1.0]) for i in range(b)]),
        "ls_token_top1": lambda: RandomTokenPolicy(slots, 1, b, cfg.prompt_len, cfg.new_tokens, 1),
        "ls_dense": lambda: FixedPolicy([(slots, [1.0 / len(slots)] * len(slots))] * b),
    }
    out = {}
    layers_mod.add_lora = traced
    try:
        for name, fn in policies.items():
            ls_generate(engine, ids, 4, fn, device)  # warm
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                t = ls_generate(engine, ids, cfg.new_tokens, fn, device)
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events) or 1
            lora = next((e.cpu_time_total for e in events if e.key == "loraswitch.add_lora"), 0)
            top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
            out[name] = {
                "total_s": round(t.total_s, 3),
                "add_lora_share": round(lora / total, 3),
                "top_ops": [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1), "calls": e.count,
                             "share": round(e.self_cpu_time_total / total, 3)} for e in top],
            }
    finally:
        layers_mod.add_lora = original
    return out


