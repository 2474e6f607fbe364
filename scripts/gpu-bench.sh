#!/usr/bin/env bash
# GPU run of issue 17 in one go (device time is short: prepare here, run there once).
#
#   here:   scripts/gpu-bench.sh prepare      # saves the tokenizer into .gpu/ (git-ignored, a few MB)
#   there:  run(command="bash scripts/gpu-bench.sh run", carry=[".gpu", ".whl"], timeout_s=560)
#           (the device image has torch, transformers, peft, typer, rich, matplotlib; nothing to install)
#           The device copies the working tree, 64 MiB at most: move src/loraswitch/libraries (109 MB of
#           adapters) out of the tree for the call and back after; these steps use random weights.
#
# "run" does, writing everything under $OUT (or benchmarks/results/gpu):
#   1. the card (nvidia-smi);
#   2. the benchmark on CUDA, one folder per step: SmolLM2's shape (random weights, fp32) at batch 1
#      and 16 with mixed batches vs PEFT adapter_names; a 7B-shaped Llama in bf16; the compiled step
#      at batch 1 with its compile time;
#   3. continuous batching on the compiled step (scripts/gpu_joins.py): CUDA graphs recorded per
#      state sizing, memory, tokens/s, answers vs the eager loop;
#   4. correctness on CUDA: the compiled decode step (inductor + CUDA graph) gives the eager loop's
#      greedy tokens for a mixed batch and batch 1 on a random SmolLM2-shaped model with adapters;
#   5. "served": the served path on CUDA (benchmarks/auto_cost.py on benchmarks/random_library.py's
#      random SmolLM2-shaped library, its router trained there): auto vs named vs base vs the engine,
#      in the library and through `serve`, 1/8/32 requests, eager and/or compiled (SERVED_MODES).
#      The server needs fastapi & co., which the image lacks: `prepare` downloads their wheels into
#      .whl/ (carry it too: carry=[".gpu", ".whl"]).
# Steps run in the order STEPS names them (the H100 run of 2026-11-26: STEPS="correctness compiled smollm2";
# its smollm2 step ran out of 150 s: give it more, or run it first). The scaling sweep runs
# by default (1..128 adapters): pass --scaling 8 to a short step. Unpack results.tgz into benchmarks/results/gpu/, then copy bench_cuda.md's tables into docs/benchmarks.md with the card named.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-run}" in
prepare)
  grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
  . .venv/bin/activate
  python -c "from loraswitch.base import load_base; load_base().tokenizer.save_pretrained('.gpu/tokenizer')"
  ls -la .gpu/tokenizer
  # the server's packages the device image lacks (Python 3.12 wheels; installed by "run" into /tmp/site)
  grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
  for pkg in fastapi starlette pydantic pydantic_core annotated-types annotated-doc typing-inspection typing_extensions \
             uvicorn opentelemetry-api; do
    version=$(python -c "import importlib.metadata as m; print(m.version('$pkg'))" 2>/dev/null) \
      || { echo "prepare: $pkg is not installed here (run scripts/setup.sh first)" >&2; exit 1; }
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 -d .whl "$pkg==$version"
  done
  ls -la .whl
  ;;
run)
  export PYTHONPATH=src PYTHONUNBUFFERED=1 LORASWITCH_TOKENIZER=.gpu/tokenizer
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=src:/tmp/site
  fi
  out="${OUT:-benchmarks/results/gpu}"
  mkdir -p "$out"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
  # each step writes its own folder and has its own time limit, so a slow step loses only itself
  # STEPS picks steps (default all); the results are packed into one results.tgz (the device returns few files)
  steps="${STEPS:-smollm2 llama7b compiled joins correctness}"
  bench() { local dir=$1 limit=$2; shift 2
    timeout "$limit" python3 benchmarks/bench.py --device cuda --out "$out/$dir" "$@" 2>&1 | tail -25 | tee "$out/$dir.log" || true; }
  for step in $steps; do case "$step" in
  # 1. SmolLM2's shape (random weights), fp32: mixed batches vs PEFT adapter_names, routing paths, scaling
  smollm2) bench smollm2 "${SMOLLM2_LIMIT:-150}" --models smollm2-shape --batch 1 --batch 16 --new-tokens 32 --prompt-len 64 --repeats 3 \
    ${SMOLLM2_SCALING:---scaling 8 --scaling 128} --configs base,merged,hf_generate,ls_explicit,ls_mixed,ls_seq,ls_token_top1,ls_dense,peft_single,peft_mixed ;;
  # 2. a 7B-shaped Llama (hidden 4096, 32 layers, random weights), bf16
  llama7b) bench llama7b 150 --models llama-4096x32 --dtype bfloat16 --batch 1 --batch 16 --new-tokens 32 --prompt-len 64 \
    --repeats 3 --scaling 8 --configs base,merged,ls_explicit,ls_mixed,ls_token_top1,peft_mixed ;;
  # 3. single stream with the compiled step (inductor + CUDA graph), compile time reported, and a
  #    mixed batch of 16 over 8 adapters on the compiled step (CUDA graphs take away the launch
  #    overhead that holds eager mixed batches at ~0.5x base on a GPU); a compile of ~90 s per batch size
  compiled) bench compiled "${COMPILED_LIMIT:-300}" --models smollm2-shape ${COMPILED_BATCHES:---batch 1 --batch 16} --new-tokens 32 \
    --prompt-len 64 --repeats 3 --configs "${COMPILED_CONFIGS:-base,merged,hf_generate,ls_explicit,ls_compiled,ls_mixed,ls_compiled_mixed,peft_mixed}" ;;
  # 4. correctness: the compiled step gives the eager loop's greedy tokens (mixed batch and batch 1)
  # 5. continuous batching on the compiled step with CUDA graphs: graphs recorded per state sizing
  joins) timeout "${JOINS_LIMIT:-240}" python3 scripts/gpu_joins.py --layers "${JOINS_LAYERS:-8}" 2>&1 | tee "$out/joins.txt" || true ;;
  correctness) timeout "${CORRECTNESS_LIMIT:-180}" python3 scripts/gpu_correctness.py 2>&1 | tee "$out/correctness.txt" || true ;;
  # the served path (5. above): a random library (kept in /tmp while the machine is warm), then auto_cost per mode
  served) lib=/tmp/random_library${SERVED_LAYERS:+_$SERVED_LAYERS}
    [ -f $lib/routers/seq_router.safetensors ] || LORASWITCH_DEVICE="${SERVED_DEVICE:-cuda}" timeout "${LIBRARY_LIMIT:-240}" \
      python3 benchmarks/random_library.py $lib ${SERVED_LAYERS:+--layers $SERVED_LAYERS} 2>&1 | grep -v 'it/s]' | tail -20 \
      | tee -a "$out/random_library.txt" || true
    for mode in ${SERVED_MODES:-eager compiled}; do
      LORASWITCH_DEVICE="${SERVED_DEVICE:-cuda}" timeout "${SERVED_LIMIT:-300}" python3 benchmarks/auto_cost.py --base $lib/base \
        --adapter-dir $lib/adapters --router-dir $lib/routers --ignore-eos --max-tokens 32 --fresh-prompts \
        --repeats "${SERVED_REPEATS:-3}" --threads 4 --tag "cuda_$mode" $([ "$mode" = compiled ] && echo --compile) \
        --server-log "$out/server_$mode.log" 2>&1 | grep -v 'it/s]' | tee "$out/served_$mode.txt" | tail -60 || true
      cp benchmarks/results/auto_cost_cuda_"$mode".* "$out/" 2>/dev/null || true
    done ;;
  *) echo "unknown step $step" >&2 ;;
  esac; done
  (cd "$out" && tar czf results.tgz --remove-files -- *)
  ;;
*)
  echo "usage: $0 prepare|run" >&2
  exit 2
  ;;
esac
