"""GPU check (scripts/gpu-bench.sh, step "joins"): continuous batching on the compiled step, where
it meets CUDA graphs. A stream of requests arrives while a batch decodes; each group joins in
freed slots or by rebuilding the static state (`static.StaticStepper.join`). CUDA graphs are
recorded per batch size and per set of tensor addresses, so how the state's rows are sized
decides how many graphs a server records: `exact` (one state per row count met, the CPU's way)
or `slots` (`static.slot_rows`: 1, 2, 4, 8, then multiples of 8). Each pass reports the graphs
recorded and replayed, the GPU memory held, tokens/s, and how many answers equal the eager loop's
alone (greedy; random weights). Passes alternate, each stream twice (the second is steady state).

    python scripts/gpu_joins.py [--device cuda] [--model smollm2-shape] [--layers 8] [--requests 48]
On a CPU it runs too (no CUDA graphs: the counts stay 0), e.g. --device cpu --model llama-tiny."""

from __future__ import annotations

import argparse
import copy
import random
import time
from collections import Counter

import torch

from loraswitch import static
from loraswitch.bench.config import LLAMA_SHAPES
from loraswitch.bench.fixtures import make_base, random_adapters
from loraswitch.engine import Engine
from loraswitch.generate import Joining, Listener, SamplingParams, explicit, generate

EVENTS: Counter = Counter()  # CUDA graph tree calls: record_function, execute_node (a replay), run_eager (warm-up)


def count_graph_events() -> None:
    try:
        from torch._inductor.cudagraph_trees import CUDAGraphTreeManager
    except ImportError:
        return
    for name in ("record_function", "execute_node", "run_eager"):
        original = getattr(CUDAGraphTreeManager, name)

        def counted(self, *a, _original=original, _name=name, **kw):
            EVENTS[_name] += 1
            return _original(self, *a, **kw)

        setattr(CUDAGraphTreeManager, name, counted)


class Stream(Listener):
    """The requests: random prompts over every adapter, token limits of their own, groups of 1-3
    arriving every `every` steps after the first `start` rows (the `admit` of `generate`)."""

    def __init__(self, names: list[str], n: int, seed: int, start: int = 4, every: int = 3):
        rng = random.Random(seed)
        self.prompts = [[rng.randrange(3, 30000) for _ in range(rng.randint(4, 28))] for _ in range(n)]
        self.names = [names[rng.randrange(len(names))] for _ in range(n)]
        self.limits = [rng.randint(6, 32) for _ in range(n)]
        self.start, self.schedule, at = start, {}, start  # admit call -> the requests [a, b) it hands in
        call = 0
        while at < n:
            size = min(rng.randint(1, 3), n - at)
            self.schedule[call] = (at, at + size)
            at, call = at + size, call + every

    def token(self, row, gen):
        return "length" if len(gen.token_ids) >= self.limits[row] else None

    def __call__(self, held):
        self.calls += 1
        span = self.groups.pop(self.calls - 1, None)
        if span is None:
            return None
        a, b = span
        return Joining(self.prompts[a:b], explicit(self.engine, self.names[a:b]), max(self.limits[a:b]))

    def run(self, engine: Engine):
        """The whole stream on `engine`, its arrivals from the start."""
        self.engine, self.groups, self.calls = engine, dict(self.schedule), 0
        params = SamplingParams(max_new_tokens=max(self.limits[: self.start]), temperature=0, stop_ids=set(),
                                logprobs=0)
        return generate(engine, self.prompts[: self.start], explicit(engine, self.names[: self.start]), params,
                        self, admit=self)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="smollm2-shape")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--layers", type=int, default=0, help="the model's layers (0: its own); fewer compile sooner")
    args = ap.parse_args()
    dev = torch.device(args.device)
    count_graph_events()
    model = args.model
    if args.layers:
        hidden, _, inter, heads, kv = LLAMA_SHAPES[model]
        model = f"{model}-{args.layers}layers"
        LLAMA_SHAPES[model] = (hidden, args.layers, inter, heads, kv)
    base = make_base(model, dev, torch.float32)
    adapters = random_adapters(base.model, args.adapters, 8, 0)
    eager, compiled = Engine(copy.deepcopy(base)), Engine(base, compile=args.backend)
    for engine in (eager, compiled):
        for a in adapters:
            engine.add_adapter(copy.deepcopy(a))
    compiled.prefix_tokens = eager.prefix_tokens = 0
    stream = Stream(eager.names, args.requests, seed=1)
    t0 = time.perf_counter()
    alone = [generate(eager, [p], explicit(eager, [n]), SamplingParams(max_new_tokens=k, temperature=0, stop_ids=set()))[0]
             .token_ids for p, n, k in zip(stream.prompts, stream.names, stream.limits)]
    print(f"eager alone, one request at a time: {time.perf_counter() - t0:.1f} s", flush=True)
    compiled.decoder = static.Decoder(args.backend, dev)
    print(f"device {dev}, model {model}, {args.requests} requests over {args.adapters} adapters, "
          f"CUDA graphs: {compiled.decoder.graphed}", flush=True)
    print("| pass | sizing | s | tok/s | same as alone | graphs recorded | replays | warm-ups | states | GPU MB reserved |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for i, sizing in enumerate(["eager", "exact", "slots", "eager", "exact", "slots"]):
        engine = eager if sizing == "eager" else compiled
        if sizing != "eager":
            compiled.decoder.graphed = sizing == "slots" and compiled.decoder.fn is not None and dev.type == "cuda"
        before = Counter(EVENTS)
        sync(dev)
        t0 = time.perf_counter()
        out = stream.run(engine)
        sync(dev)
        wall = time.perf_counter() - t0
        got = [g.token_ids for g in out]
        # rows come back in the order they were handed in: the first ones, then each group
        same = sum(g == w for g, w in zip(got, alone))
        tokens = sum(len(g) for g in got)
        delta = EVENTS - before
        mb = torch.cuda.memory_reserved(dev) / 2**20 if dev.type == "cuda" else 0
        states = sorted(compiled.decoder.states) if sizing != "eager" else "-"
        print(f"| {i} | {sizing} | {wall:.1f} | {tokens / wall:.0f} | {same}/{len(got)} | {delta['record_function']} "
              f"| {delta['execute_node']} | {delta['run_eager']} | {states} | {mb:.0f} |", flush=True)
    print("compile (first call per (rows, length, choices), s):", compiled.decoder.compile_s,
          "fell back:", compiled.decoder.failed, flush=True)
    print("inductor counters (cudagraph_skips counts graphs not captured):", dict(torch._dynamo.utils.counters["inductor"]), flush=True)


if __name__ == "__main__":
    main()
