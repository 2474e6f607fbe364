"""GPU check (scripts/gpu-bench.sh, step "correctness"): the compiled decode step (inductor + CUDA
graphs) gives the eager loop's greedy tokens, for a mixed batch (two adapters and a base row) and
for batch 1, on a random SmolLM2-shaped model with random adapters. Runs on CPU too (slowly)."""

import copy
import sys
import time

import torch

from loraswitch.bench.fixtures import make_base, random_adapters
from loraswitch.engine import Engine
from loraswitch.generate import SamplingParams, explicit, generate

dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
shape = sys.argv[2] if len(sys.argv) > 2 else "smollm2-shape"
base = make_base(shape, dev, torch.float32)
adapters = random_adapters(base.model, 3, 8, 0)
eager, compiled = Engine(copy.deepcopy(base)), Engine(base, compile=True)
for engine in (eager, compiled):
    for a in adapters:
        engine.add_adapter(copy.deepcopy(a))
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(3, 30000, (n,), generator=g).tolist() for n in (12, 20, 7)]
params = SamplingParams(max_new_tokens=24, stop_ids=set())
same_everywhere = True
for rows, names in ((prompts, ["a000", None, "a002"]), (prompts[:1], ["a001"])):
    want = [x.token_ids for x in generate(eager, rows, explicit(eager, names), params)]
    for i in range(2):
        t0 = time.perf_counter()
        got = [x.token_ids for x in generate(compiled, rows, explicit(compiled, names), params)]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        same_everywhere &= got == want
        print(f"batch {len(rows)} run {i}: {time.perf_counter() - t0:.2f} s, same tokens as eager: {got == want}", flush=True)
print("compile (first call per shape, s):", compiled.decoder.compile_s, "fell back:", compiled.decoder.failed)
print("RESULT:", "same tokens" if same_everywhere and not compiled.decoder.failed else "DIFFERENT or fell back")
