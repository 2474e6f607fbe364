"""Each `kernels.add_lora` strategy timed alone, on the weight shapes of SmolLM2's targeted
linears, next to the base linear it rides on: what one LoRA'd linear adds to a decode step.

Random rank-16 factors (`--rank`) for 8 adapters (the stack holds 9 entries: slot 0 is "no adapter"),
tokens routed top-1 at random over them (a mixed batch, or per-token routing), eager, one torch
thread. Strategies are timed round-robin (interleaved), median of --rounds, so a busy machine
slows them alike; the ratio to the base linear is the number to read.

    python benchmarks/lora_kernels.py --doc docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from loraswitch import kernels
from loraswitch.kernels import Routing, SlotRouting, add_lora, concat_stack
from loraswitch.layers import MultiLoRALinear, RoutingContext
from loraswitch.library import LoraModule

SHAPES = {"q_proj, o_proj": (576, 576), "k_proj, v_proj": (576, 192), "gate_proj, up_proj": (576, 1536),
          "down_proj": (1536, 576)}
N_ADAPTERS, RANK = 8, 16


def strategies(in_f: int, out_f: int, tokens: int, gen: torch.Generator, rank: int = RANK) -> dict:
    """name -> a call computing one layer's LoRA delta for `tokens` decode tokens."""
    RANK = rank  # noqa: N806 (the module default, overridden by --rank)
    A = torch.randn(N_ADAPTERS + 1, RANK, in_f, generator=gen) / in_f**0.5
    B = torch.randn(N_ADAPTERS + 1, out_f, RANK, generator=gen) / RANK
    A[0], B[0] = 0, 0
    ranks = [0] + [RANK] * N_ADAPTERS
    W = torch.randn(out_f, in_f, generator=gen) / in_f**0.5
    x, y = torch.randn(tokens, in_f, generator=gen), torch.randn(tokens, out_f, generator=gen)
    ids, w = torch.randint(0, N_ADAPTERS, (tokens, 1), generator=gen), torch.ones(tokens, 1)
    stack, slots = concat_stack(A, B, ranks), SlotRouting(ids, w)
    # one routing per step, shared by every layer (what it derives, e.g. its mask, is computed once)
    one, mixed = Routing.single(tokens, 0), Routing(ids, w)

    cache: dict = {}  # the layer's factor cache, kept across calls as across decode steps

    def eager(whole: bool = False, **limits):
        def run():
            saved = {k: getattr(kernels, k) for k in limits}
            for k, v in limits.items():
                setattr(kernels, k, v)
            try:
                add_lora(y, x, A, B, ranks, mixed, cache, stack if whole else None)
            finally:
                for k, v in saved.items():
                    setattr(kernels, k, v)
        return run

    layer = MultiLoRALinear(torch.nn.Linear(in_f, out_f, bias=False), "p", RoutingContext())
    layer.base.weight.data.copy_(W)
    layer.set_slot(0, LoraModule(A[1], B[1], 1.0))
    layer.ctx.static = Routing.single(tokens, -1)
    x3 = x.view(1, tokens, in_f)

    return {"base linear (reference)": lambda: torch.nn.functional.linear(x, W),
            "layer call, no adapter routed (base linear + the wrapper)": lambda: layer(x3),
            "one adapter (uniform)": lambda: add_lora(y, x, A, B, ranks, one, cache),
            "mixed, compiled C kernel (BGMV; eager default up to 128 tokens x rank)": eager(True, BGMV_MAX_TOKEN_RANKS=10**9),
            "mixed, whole stack (masked GEMMs)": eager(True, BGMV_MAX_TOKEN_RANKS=0),
            "mixed, gather": eager(STACK_MAX_COLS=0, GATHER_MAX_PAIRS=10**9),
            "mixed, grouped": eager(STACK_MAX_COLS=0, GATHER_MAX_PAIRS=0),
            "fixed-shape, masked (compiled step)": lambda: add_lora(y, x, A, B, ranks, slots, stack=stack),
            "fixed-shape, gathered (compiled step, wide stacks)": lambda: add_lora(y, x, A, B, ranks, slots)}


def measure(tokens: int, rounds: int, inner: int = 20, rank: int = RANK) -> dict[str, dict[str, float]]:
    """Median microseconds per call, per shape and strategy."""
    gen = torch.Generator().manual_seed(0)
    out: dict[str, dict[str, float]] = {}
    for label, (in_f, out_f) in SHAPES.items():
        fns = strategies(in_f, out_f, tokens, gen, rank)
        times: dict[str, list[float]] = {k: [] for k in fns}
        with torch.inference_mode():
            for f in fns.values():  # warm-up
                f()
            for _ in range(rounds):
                for name, f in fns.items():
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        f()
                    times[name].append((time.perf_counter() - t0) / inner)
        out[label] = {k: 1e6 * statistics.median(v) for k, v in times.items()}
    return out


def markdown(results: dict[int, dict], rounds: int, rank: int = RANK) -> str:
    lines = [f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, rank {rank}, 1 torch thread, load average "
             f"{os.getloadavg()[0]:.1f}, median of {rounds} interleaved rounds; microseconds per call and, in "
             "brackets, the cost relative to the base linear of that shape. Reproduce: "
             "`python benchmarks/lora_kernels.py`.", ""]
    for tokens, res in results.items():
        names = list(next(iter(res.values())))
        lines += [f"Batch of {tokens} decode token(s):", "", "| strategy | " + " | ".join(res) + " |",
                  "|---|" + "---|" * len(res)]
        for name in names:
            cells = [f"{res[s][name]:.0f} ({res[s][name] / res[s]['base linear (reference)']:.2f}x)" for s in res]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,16", help="comma-separated batch sizes (decode tokens per call)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--rank", type=int, default=RANK, help="every adapter's rank")
    p.add_argument("--doc", help="write the table into this markdown file's generated block (lora-kernels)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = {int(t): measure(int(t), args.rounds, rank=args.rank) for t in args.tokens.split(",")}
    text = markdown(results, args.rounds, args.rank)
    print(text)
    if args.doc:
        from loraswitch.eval.report import update_doc

        update_doc(Path(args.doc), "lora-kernels", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
