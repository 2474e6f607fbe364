"""The eager loop's KV cache (`kvcache.GrowingCache`, appending in place) against transformers'
`DynamicCache` (a `torch.cat` per layer per step), inside real decode steps: `generate` on
SmolLM2 with 8 random rank-8 adapters, no adapter (`none`) or one per request (`mixed`), the cache
class swapped between runs of one process, alternating order each round (round 0 is a warm-up).

    python benchmarks/kv_cache_ab.py --batch 16 --rounds 6     # ~5 minutes on one core
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, action="append", help="batch sizes (repeatable; default 16)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args(argv)

    from transformers import DynamicCache

    import loraswitch.decode as decode
    from loraswitch.bench.fixtures import smollm2_engine
    from loraswitch.bench.measure import ls_generate
    from loraswitch.generate import FixedPolicy
    from loraswitch.kvcache import GrowingCache

    def dynamic(kv=None) -> DynamicCache:  # GrowingCache's signature, transformers' cache
        return DynamicCache(ddp_cache_data=kv) if kv else DynamicCache()

    torch.set_num_threads(1)
    device = torch.device("cpu")
    engine, slots = smollm2_engine()
    caches = {"DynamicCache": dynamic, "GrowingCache": GrowingCache}
    lines = [f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, 1 thread, load average {os.getloadavg()[0]:.1f}; "
             f"decode tokens/s, median of {args.rounds - 1} rounds, {args.prompt_len}-token prompts, "
             f"{args.new_tokens} new tokens (`python benchmarks/kv_cache_ab.py`):", "",
             "| batch | routing | DynamicCache | GrowingCache | growing / dynamic |", "|---|---|---|---|---|"]
    try:
        for b in args.batch or [16]:
            ids = torch.randint(3, 30000, (b, args.prompt_len), generator=torch.Generator().manual_seed(0))
            policies = {"none": partial(FixedPolicy, [([-1], [1.0])] * b),
                        "mixed (8 adapters)": partial(FixedPolicy, [([slots[i % 8]], [1.0]) for i in range(b)])}
            for name, policy in policies.items():
                runs: dict[str, list[float]] = {k: [] for k in caches}
                for rnd in range(args.rounds):
                    for label in caches if rnd % 2 == 0 else reversed(caches):
                        decode.GrowingCache = caches[label]
                        t = ls_generate(engine, ids, args.new_tokens, policy, device)
                        if rnd:
                            runs[label].append(t.decode_tps)
                d, g = (statistics.median(runs[k]) for k in caches)
                lines.append(f"| {b} | {name} | {d:.1f} | {g:.1f} | {g / d:.3f}x |")
    finally:
        decode.GrowingCache = GrowingCache
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
