"""The C BGMV kernel (`kernels/cpu.py`) against the masked GEMMs it replaces, inside real decode
steps: `generate` on SmolLM2 with 8 random rank-8 adapters, one per request (`mixed`) or drawn
per token (`top1`), the kernel switched on and off between runs of one process, alternating
order each round (round 0 is a warm-up). Microbenchmarks (`lora_kernels.py`) time the kernels on
operands hot in cache; here the factors come from memory, as they do in a decode step. The last
column is the kernel's own time per decode step (its calls timed inside the kernel runs).

    python benchmarks/cpu_kernel_ab.py --batch 4 --batch 16 --rounds 7    # ~4 minutes on one core
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
    p.add_argument("--batch", type=int, action="append", help="batch sizes (repeatable; default 4 and 16)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--new-tokens", type=int, default=24)
    args = p.parse_args(argv)

    import loraswitch.kernels as kernels
    from loraswitch.bench.fixtures import RandomTokenPolicy, make_base, random_adapters
    from loraswitch.bench.measure import ls_generate
    from loraswitch.engine import Engine
    from loraswitch.generate import FixedPolicy

    torch.set_num_threads(1)
    device = torch.device("cpu")
    base = make_base("smollm2", device, torch.float32, 0)
    engine = Engine(base)
    engine.prefix_tokens = 0
    for adapter in random_adapters(base.model, 8, 8, 0):
        engine.add_adapter(adapter)
    slots = [engine.slot_of(name) for name in engine.names]
    assert kernels.cpu.available(), kernels.cpu.failure()
    spent: list[float] = []  # seconds in the kernel's calls during the current run
    call = kernels.cpu.bgmv_

    def timed(*operands) -> bool:
        t0 = time.perf_counter()
        done = call(*operands)
        spent.append(time.perf_counter() - t0)
        return done

    kernels.cpu.bgmv_ = timed
    on = kernels.BGMV_MAX_TOKEN_RANKS
    lines = [f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, 1 thread, load average {os.getloadavg()[0]:.1f}; "
             f"decode tokens/s, median of {args.rounds - 1} rounds (`python benchmarks/cpu_kernel_ab.py`):", "",
             "| batch | routing | masked GEMMs | C kernel | kernel / masked | kernel ms / step |", "|---|---|---|---|---|---|"]
    for b in args.batch or [4, 16]:
        ids = torch.randint(3, 30000, (b, 32), generator=torch.Generator().manual_seed(0))
        policies = {"one adapter per request": partial(FixedPolicy, [([slots[i % 8]], [1.0]) for i in range(b)]),
                    "per-token top-1": partial(RandomTokenPolicy, slots, 1, b, 32, args.new_tokens, 1)}
        for name, policy in policies.items():
            runs: dict[bool, list[float]] = {True: [], False: []}
            per_step: list[float] = []
            for rnd in range(args.rounds):
                for kernel in (True, False) if rnd % 2 == 0 else (False, True):
                    kernels.BGMV_MAX_TOKEN_RANKS = on if kernel else 0
                    spent.clear()
                    t = ls_generate(engine, ids, args.new_tokens, policy, device)
                    if rnd:
                        runs[kernel].append(t.decode_tps)
                        if kernel:
                            per_step.append(1000 * sum(spent) / (args.new_tokens - 1))
            kernels.BGMV_MAX_TOKEN_RANKS = on
            k, m = statistics.median(runs[True]), statistics.median(runs[False])
            lines.append(f"| {b} | {name} | {m:.1f} | {k:.1f} | {k / m:.3f}x | {statistics.median(per_step):.1f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
