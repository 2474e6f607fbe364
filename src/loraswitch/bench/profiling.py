"""Where decode time goes (`--profile`): the torch profiler over loraswitch's decode paths."""

from __future__ import annotations

import torch

from loraswitch.bench.config import BenchConfig
from loraswitch.bench.fixtures import RandomTokenPolicy
from loraswitch.bench.measure import ls_generate
from loraswitch.engine import Engine
from loraswitch.generate import FixedPolicy


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


