"""Where a compiled decode step spends its time: `generate` on the default base model with no
adapter, eager vs the compiled step (`Engine.compile`), at one batch size, timed round-robin,
then the torch profiler's top operators for one compiled generation.

No adapter on purpose: it separates what the compiled base step costs from what the LoRA path
adds (`benchmarks/lora_kernels.py` times that alone).

    python benchmarks/compiled_step.py --batch 16      # about 2 minutes with the compile
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=8, help="profiler rows to print")
    p.add_argument("--min-cache", type=int, help="override static.MIN_CACHE_LEN (the shortest static cache bucket)")
    p.add_argument("--repeat-kv", action="store_true",
                   help="transformers' own SDPA attention (keys and values repeated per query head under "
                        "torch.compile) instead of the engine's packed one (base._packed_sdpa): the before")
    args = p.parse_args(argv)

    from torch.profiler import ProfilerActivity, profile

    from loraswitch.base import load_base
    from loraswitch.engine import Engine
    from loraswitch.generate import SamplingParams, generate

    torch.set_num_threads(args.threads)
    if args.min_cache:
        import loraswitch.static

        loraswitch.static.MIN_CACHE_LEN = args.min_cache
    engine = Engine(load_base())
    if args.repeat_kv:
        engine.model.set_attn_implementation("sdpa")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (args.prompt_len,), generator=gen).tolist() for _ in range(args.batch)]
    params = SamplingParams(max_new_tokens=args.new_tokens)

    def run(compiled: bool) -> float:
        engine.compile = compiled
        t0 = time.perf_counter()
        generate(engine, prompts, None, params)
        return time.perf_counter() - t0

    run(False)
    first = run(True)  # compiles this (batch, cache length) shape
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        times["eager"].append(run(False))
        times["compiled"].append(run(True))
    med = {k: statistics.median(v) for k, v in times.items()}
    engine.compile = True
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(engine, prompts, None, params)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {args.threads} threads, load average "
          f"{os.getloadavg()[0]:.1f}: base model, batch {args.batch}, {args.prompt_len}-token prompts, "
          f"{args.new_tokens} new tokens, static cache bucket >= {args.min_cache or 'default'}, attention "
          f"{engine.model.config._attn_implementation}; first compiled call {first:.1f} s; median of {args.rounds} rounds: eager "
          f"{med['eager']:.3f} s, compiled {med['compiled']:.3f} s per generation (compiled = "
          f"{med['eager'] / med['compiled']:.2f}x the eager speed)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
