#!/usr/bin/env bash
# GPU run of issue 17 in one go (device time is short: prepare here, run there once).
#
#   here:   scripts/gpu-bench.sh prepare      # saves the tokenizer into .gpu/ (git-ignored, a few MB)
#   there:  run(command="bash scripts/gpu-bench.sh run", carry=[".gpu"], timeout_s=560)
#           (the device image has torch, transformers, peft, typer, rich, matplotlib; nothing to install)
#
# "run" does, writing everything under $OUT (or benchmarks/results/gpu):
#   1. the card (nvidia-smi);
#   2. the benchmark on CUDA, one folder per step: SmolLM2's shape (random weights, fp32) at batch 1
#      and 16 with mixed batches vs PEFT adapter_names; a 7B-shaped Llama in bf16; the compiled step
#      at batch 1 with its compile time;
#   3. correctness on CUDA: the compiled decode step (inductor + CUDA graph) gives the eager loop's
#      greedy tokens for a mixed batch and batch 1 on a random SmolLM2-shaped model with adapters.
# Steps 1 and 2 were measured on 2026-11-26 (benchmarks/results/gpu/); next time run
# STEPS="compiled correctness" first. Unpack results.tgz into benchmarks/results/gpu/, then copy bench_cuda.md's tables into docs/benchmarks.md with the card named.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-run}" in
prepare)
  grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
  . .venv/bin/activate
  python -c "from loraswitch.base import load_base; load_base().tokenizer.save_pretrained('.gpu/tokenizer')"
  ls -la .gpu/tokenizer
  ;;
run)
  export PYTHONPATH=src PYTHONUNBUFFERED=1 LORASWITCH_TOKENIZER=.gpu/tokenizer
  out="${OUT:-benchmarks/results/gpu}"
  mkdir -p "$out"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
  # each step writes its own folder and has its own time limit, so a slow step loses only itself
  # STEPS picks steps (default all); the results are packed into one results.tgz (the device returns few files)
  steps="${STEPS:-smollm2 llama7b compiled correctness}"
  bench() { local dir=$1 limit=$2; shift 2
    [[ " $steps " == *" $dir "* ]] || return 0
    timeout "$limit" python3 benchmarks/bench.py --device cuda --out "$out/$dir" "$@" 2>&1 | tail -25 | tee "$out/$dir.log" || true; }
  # 1. SmolLM2's shape (random weights), fp32: mixed batches vs PEFT adapter_names, routing paths, scaling
  bench smollm2 150 --models smollm2-shape --batch 1 --batch 16 --new-tokens 32 --prompt-len 64 --repeats 3 \
    --scaling 8 --scaling 128 --configs base,merged,hf_generate,ls_explicit,ls_mixed,ls_seq,ls_token_top1,ls_dense,peft_single,peft_mixed
  # 2. a 7B-shaped Llama (hidden 4096, 32 layers, random weights), bf16
  bench llama7b 150 --models llama-4096x32 --dtype bfloat16 --batch 1 --batch 16 --new-tokens 32 --prompt-len 64 \
    --repeats 3 --scaling 8 --configs base,merged,ls_explicit,ls_mixed,ls_token_top1,peft_mixed
  # 3. single stream with the compiled step (inductor + CUDA graph), compile time reported
  #    and a mixed batch of 16 over 8 adapters on the compiled step (CUDA graphs take away the launch
  #    overhead that holds eager mixed batches at ~0.5x base on a GPU); two compiles of ~90 s each
  bench compiled 300 --models smollm2-shape --batch 1 --batch 16 --new-tokens 32 --prompt-len 64 --repeats 3 --scaling 8 \
    --configs base,merged,hf_generate,ls_explicit,ls_compiled,ls_mixed,ls_compiled_mixed
  # 4. correctness (steps 1-3 are issue 17's item 6): the compiled step gives the eager loop's greedy tokens (mixed batch and batch 1)
  [[ " $steps " == *" correctness "* ]] && timeout 90 python3 - <<'PY' 2>&1 | tee "$out/correctness.txt" || true
import copy, time, torch
from loraswitch.bench.fixtures import make_base, random_adapters
from loraswitch.engine import Engine
from loraswitch.generate import SamplingParams, explicit, generate

dev = torch.device("cuda")
base = make_base("smollm2-shape", dev, torch.float32)
ads = random_adapters(base.model, 3, 8, 0)
eager, comp = Engine(copy.deepcopy(base)), Engine(base, compile=True)
for e in (eager, comp):
    for a in ads:
        e.add_adapter(copy.deepcopy(a))
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(3, 30000, (n,), generator=g).tolist() for n in (12, 20, 7)]
params = SamplingParams(max_new_tokens=24, stop_ids=set())
for rows, names in ((prompts, ["a000", None, "a002"]), (prompts[:1], ["a001"])):
    want = [x.token_ids for x in generate(eager, rows, explicit(eager, names), params)]
    for i in range(2):
        t0 = time.perf_counter()
        got = [x.token_ids for x in generate(comp, rows, explicit(comp, names), params)]
        torch.cuda.synchronize()
        print(f"batch {len(rows)} run {i}: {time.perf_counter() - t0:.2f} s, same tokens as eager: {got == want}")
print("compile (first call per shape, s):", comp.decoder.compile_s, "fell back:", comp.decoder.failed)
PY
  (cd "$out" && tar czf results.tgz --remove-files -- *)
  ;;
*)
  echo "usage: $0 prepare|run" >&2
  exit 2
  ;;
esac
