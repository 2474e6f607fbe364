"""Is the compiled step's graph for "any cache length" as fast as one traced for a single length?

With transformers' fixed-address marks on the static cache (kept where CUDA graphs replay the
step), the first cache length bucket is traced for that length alone; the second is traced anew
and dynamo then makes the length symbolic (automatic dynamic shapes), so that graph serves every
longer bucket. Without CUDA graphs (a CPU) the marks are dropped and the length is symbolic from
the first graph (`static._any_length`). This times decode at the 256 bucket (8 rows, one
demo-shaped random adapter each, 200-token prompts) and, where the mode meets it, at the 64
bucket (32-token prompts), with:
  --mode special  marks kept, 256 the first length this process meets (a graph for 256 alone);
  --mode generic  marks kept, 64 and 128 first (64's graph for 64 alone, then the symbolic one);
  --mode any      marks dropped (the CPU default): 64 first, one graph for every length.
Run two modes at once, each pinned to a core of its own, for a same-time comparison:

    taskset -c 0 python benchmarks/bucket_graph_ab.py --mode generic &
    taskset -c 1 python benchmarks/bucket_graph_ab.py --mode any      # ~5 minutes each
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["special", "generic", "any"], required=True)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    from torch._dynamo.utils import counters

    from loraswitch.bench.fixtures import smollm2_engine
    from loraswitch.bench.measure import ls_generate
    from loraswitch.generate import FixedPolicy

    torch.set_num_threads(1)
    engine, slots = smollm2_engine(compile=True)
    from loraswitch.static import Decoder

    engine.decoder = Decoder("inductor")
    engine.decoder.any_length = args.mode == "any"

    def run(rows: int, length: int, new: int = 24):
        ids = torch.randint(3, 30000, (rows, length), generator=torch.Generator().manual_seed(rows))
        policy = partial(FixedPolicy, [([slots[i % 8]], [1.0]) for i in range(rows)])
        return ls_generate(engine, ids, new, policy, torch.device("cpu"))

    short = ""
    if args.mode != "special":
        t0 = time.perf_counter()
        run(8, 32)  # the 64 bucket
        first_short = time.perf_counter() - t0
        short_tps = [run(8, 32).decode_tps for _ in range(args.repeats)]
        short = (f"first generation at the 64 bucket {first_short:.1f} s, "
                 f"decode tok/s at 64 positions, 8 rows: median {statistics.median(short_tps):.1f} of "
                 f"{[round(x, 1) for x in short_tps]}; ")
    if args.mode == "generic":
        run(3, 100)  # the 128 bucket: its graph takes any length
    t0 = time.perf_counter()
    run(8, 200)  # the 256 bucket
    first = time.perf_counter() - t0
    tps = [run(8, 200).decode_tps for _ in range(args.repeats)]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} --mode {args.mode}: {short}first generation at the 256 "
          f"bucket {first:.1f} s, graphs traced {counters['stats']['unique_graphs']}; decode tok/s at 256 positions, "
          f"8 rows: median {statistics.median(tps):.1f} of {[round(x, 1) for x in tps]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
