"""How often the compiled decode step compiles as a server meets batches of different sizes:
`generate` on SmolLM2 with 8 random rank-8 adapters on `Engine(compile=True)`, a sequence of
batches (rows, prompt length, one adapter per request or none), each one's wall time and decode
rate, then the decoder's first call per (rows, cache length, choices) key: a compile (tens of
seconds) or a reuse of a graph traced for another batch size (well under a second). The last two
batches reach the 256 and 512 position buckets: after the 64 and 128 buckets have compiled,
dynamo has made the cache length symbolic and they reuse the 128 bucket's graph
(`static.Decoder.covers`).

    python benchmarks/compile_shapes.py        # ~8 minutes on one core, most of it compiling
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial

import torch

SEQUENCE = ((8, 32, True), (3, 100, True), (12, 32, False), (5, 40, False), (1, 32, True), (16, 32, True),
            (16, 32, False), (4, 200, True), (6, 400, True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=24)
    args = p.parse_args(argv)

    from loraswitch.bench.fixtures import smollm2_engine
    from loraswitch.bench.measure import ls_generate
    from loraswitch.generate import NO_ADAPTER, FixedPolicy

    torch.set_num_threads(1)
    device = torch.device("cpu")
    engine, slots = smollm2_engine(compile=True)
    lines = [f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, 1 thread, load average {os.getloadavg()[0]:.1f} "
             "(`python benchmarks/compile_shapes.py`):", "",
             "| rows | prompt tokens | adapters | wall s | decode tok/s |", "|---|---|---|---|---|"]
    for rows, length, routed in SEQUENCE:
        ids = torch.randint(3, 30000, (rows, length), generator=torch.Generator().manual_seed(rows))
        choices = [([slots[i % 8]], [1.0]) for i in range(rows)] if routed else [NO_ADAPTER] * rows
        t0 = time.perf_counter()
        t = ls_generate(engine, ids, args.new_tokens, partial(FixedPolicy, choices), device)
        lines.append(f"| {rows} | {length} | {'one per request' if routed else 'none'} | "
                     f"{time.perf_counter() - t0:.1f} | {t.decode_tps:.1f} |")
    lines += ["", "First call per (rows, cache length, choices; 0 = no adapter routed), seconds: "
              + ", ".join(f"{r}x{n}x{k}: {s}" for (r, n, k), s in engine.decoder.compile_s.items())
              + (f"; failed: {engine.decoder.failed}" if engine.decoder.failed else "")]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
