"""Is the compiled step's graph for "any cache length" as fast as one traced for a single length?

The static step's first cache length bucket is traced for that length alone; the second is
traced anew and dynamo then makes the length symbolic (automatic dynamic shapes), so that graph
serves every longer bucket (`static.Decoder.covers`: `serve --compile` warms 64 and 128 and
compiles nothing for 256, 512, ...). This times decode at the 256 bucket (8 rows, one demo-shaped
random adapter each, 200-token prompts) on a graph traced for 256 alone (`--mode special`: 256 is
the first length this process meets) and on the symbolic one (`--mode generic`: 64 and 128 first).
Run the two modes at once, each pinned to a core of its own, for a same-time comparison:

    taskset -c 0 python benchmarks/bucket_graph_ab.py --mode special &
    taskset -c 1 python benchmarks/bucket_graph_ab.py --mode generic      # ~5 minutes each
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["special", "generic"], required=True)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    from torch._dynamo.utils import counters

    from loraswitch.bench.fixtures import smollm2_engine
    from loraswitch.bench.measure import ls_generate
    from loraswitch.generate import FixedPolicy

    torch.set_num_threads(1)
    engine, slots = smollm2_engine(compile=True)

    def run(rows: int, length: int, new: int = 24):
        ids = torch.randint(3, 30000, (rows, length), generator=torch.Generator().manual_seed(rows))
        policy = partial(FixedPolicy, [([slots[i % 8]], [1.0]) for i in range(rows)])
        return ls_generate(engine, ids, new, policy, torch.device("cpu"))

    if args.mode == "generic":
        run(8, 32)  # the 64 bucket, then the 128 bucket: its graph takes any length
        run(3, 100)
    t0 = time.perf_counter()
    run(8, 200)  # the 256 bucket
    first = time.perf_counter() - t0
    tps = [run(8, 200).decode_tps for _ in range(args.repeats)]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} --mode {args.mode}: first generation at the 256 "
          f"bucket {first:.1f} s, graphs traced {counters['stats']['unique_graphs']}; decode tok/s at 256 positions, "
          f"8 rows: median {statistics.median(tps):.1f} of {[round(x, 1) for x in tps]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
