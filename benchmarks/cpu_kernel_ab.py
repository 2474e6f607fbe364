"""The C BGMV kernel (`kernels/cpu.py`) against the masked GEMMs it replaces, inside real decode
steps: `generate` on SmolLM2 with 8 random rank-8 adapters, one per request or drawn per token
(top-1), the kernel switched on and off between runs of one process, alternating order each
round (round 0 is a warm-up). Microbenchmarks (`lora_kernels.py`) time the kernels on operands
hot in cache; here the factors come from memory, as they do in a decode step.

Two more arms say where a routed step's extra time goes: `no adapter` (every row routed to none,
the same loop: the reference) and `kernel skipped` (the kernel's call returns at once, so the
LoRA term is *not* added: a timing arm only, its tokens are the base model's). What `kernel
skipped` costs over `no adapter` is the Python and dispatch of the routed path; what `C kernel`
costs over `kernel skipped` is the kernel's own work, also timed per step in the last column.

    python benchmarks/cpu_kernel_ab.py --batch 4 --batch 16 --rounds 7    # ~8 minutes on one core
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial

import torch

ARMS = ("no adapter", "masked GEMMs", "C kernel", "kernel skipped")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, action="append", help="batch sizes (repeatable; default 4 and 16)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--new-tokens", type=int, default=24)
    args = p.parse_args(argv)

    import loraswitch.kernels as kernels
    from loraswitch.bench.fixtures import RandomTokenPolicy, smollm2_engine
    from loraswitch.bench.measure import ls_generate
    from loraswitch.generate import NO_ADAPTER, FixedPolicy

    torch.set_num_threads(1)
    device = torch.device("cpu")
    engine, slots = smollm2_engine()
    assert kernels.cpu.available(), kernels.cpu.failure()
    spent: list[float] = []  # seconds in the kernel's calls during the current run
    call, on = kernels.cpu.bgmv_, kernels.BGMV_MAX_TOKEN_RANKS
    skip = False

    def timed(*operands) -> bool:
        if skip:
            return True  # "done", nothing added: the kernel skipped arm
        t0 = time.perf_counter()
        done = call(*operands)
        spent.append(time.perf_counter() - t0)
        return done

    kernels.cpu.bgmv_ = timed
    lines = [f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, 1 thread, load average {os.getloadavg()[0]:.1f}; "
             f"decode tokens/s, median of {args.rounds - 1} rounds (`python benchmarks/cpu_kernel_ab.py`):", "",
             "| batch | routing | " + " | ".join(ARMS) + " | kernel / masked | kernel / no adapter | kernel ms / step |",
             "|---|---|" + "---|" * (len(ARMS) + 3)]
    for b in args.batch or [4, 16]:
        ids = torch.randint(3, 30000, (b, 32), generator=torch.Generator().manual_seed(0))
        policies = {"one adapter per request": partial(FixedPolicy, [([slots[i % 8]], [1.0]) for i in range(b)]),
                    "per-token top-1": partial(RandomTokenPolicy, slots, 1, b, 32, args.new_tokens, 1)}
        for name, policy in policies.items():
            runs: dict[str, list[float]] = {arm: [] for arm in ARMS}
            per_step: list[float] = []
            for rnd in range(args.rounds):
                for arm in ARMS if rnd % 2 == 0 else reversed(ARMS):
                    kernels.BGMV_MAX_TOKEN_RANKS = 0 if arm == "masked GEMMs" else on
                    skip = arm == "kernel skipped"
                    spent.clear()
                    arm_policy = partial(FixedPolicy, [NO_ADAPTER] * b) if arm == "no adapter" else policy
                    t = ls_generate(engine, ids, args.new_tokens, arm_policy, device)
                    if rnd:
                        runs[arm].append(t.decode_tps)
                        if arm == "C kernel":
                            per_step.append(1000 * sum(spent) / (args.new_tokens - 1))
            kernels.BGMV_MAX_TOKEN_RANKS, skip = on, False
            med = {arm: statistics.median(v) for arm, v in runs.items()}
            cells = " | ".join(f"{med[arm]:.1f}" for arm in ARMS)
            lines.append(f"| {b} | {name} | {cells} | {med['C kernel'] / med['masked GEMMs']:.3f}x | "
                         f"{med['C kernel'] / med['no adapter']:.3f}x | {statistics.median(per_step):.1f} |")
    kernels.cpu.bgmv_ = call
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
