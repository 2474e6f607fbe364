#!/usr/bin/env bash
# Regenerate every number the README and docs/ show, in one go (about an hour on 2 CPU cores).
# Each step rewrites its own generated block; nothing in those blocks is typed by hand.
#   zoo      the demo adapters on their test splits        -> README.md, libraries/demo/adapters/manifest.json
#   eval     quality of every method on the demo suite      -> README.md, docs/evaluation.md, benchmarks/results/eval/
#   routing  near misses and new wordings on the probe sets, the settings' trade-off, and routing once the
#            library has grown (about 30 minutes)
#                                                           -> docs/routing.md, benchmarks/results/routing_probe_demo*
#   bench    speed and memory vs merged weights and PEFT    -> README.md, docs/benchmarks.md, benchmarks/results/bench_cpu.*
#            (--quick: SmolLM2, batches 1 and 16, 8 / 128 / 1,000 adapters, one torch thread; `python
#            benchmarks/bench.py` alone adds a random 280M Llama; ~20 minutes on one core)
#   load     the server under 200 concurrent requests, and chunked prefill -> docs/server.md, docs/benchmarks.md,
#            benchmarks/results/server_load.*, chunked_prefill*
#   soak     the server over 3000 requests with adapters unloaded and reloaded under load (about 15 minutes)
#                                                           -> docs/server.md, benchmarks/results/soak_server.*
#   ray      scale-out on Ray Serve (needs loraswitch[ray]): plain vs 1 and 2 replicas, a library spread over
#            replicas, what routing and a page-in cost (about 15 minutes) -> docs/scale-out.md, benchmarks/results/ray_serve*
#   bigbench the BIG-bench library (needs `loraswitch data bigbench`; not in the default set, hours on 2 cores):
#            adapters on their test splits, its routers, a small eval -> docs/real-tasks.md,
#            libraries/bigbench/{adapters/manifest.json,routers/}, benchmarks/results/eval_bigbench/
# Run a subset by naming steps: `bash scripts/refresh-results.sh eval bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
. .venv/bin/activate
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(zoo eval routing bench load soak)
for step in "${steps[@]}"; do
  case "$step" in
    zoo) loraswitch zoo eval --doc README.md ;;
    eval) loraswitch eval --limit 10 --out benchmarks/results/eval --doc docs/evaluation.md --readme README.md ;;
    routing)
      python benchmarks/routing_probe.py --library demo --doc docs/routing.md
      python benchmarks/routing_probe.py --library demo --sweep --doc docs/routing.md
      python benchmarks/growing_library.py --doc docs/routing.md
      python benchmarks/growing_cascade.py --doc docs/routing.md
      # requests no adapter fits, asked next to a task's (printed; docs/routing.md's table)
      for set in "" benchmarks/open_requests_heldout.json benchmarks/open_requests_heldout2.json; do
        python benchmarks/open_requests.py ${set:+--file "$set"}
      done
      # other layouts of several requests (docs/routing.md's table, benchmarks/results/layouts*.json)
      python benchmarks/layouts.py --out benchmarks/results/layouts.json
      for k in _heldout _heldout2 _heldout3 _heldout4 _heldout5 _dashes; do
        python benchmarks/layouts.py --file "benchmarks/layouts$k.json" --out "benchmarks/results/layouts$k.json"
      done ;;
    bench) LORASWITCH_THREADS=${LORASWITCH_THREADS:-1} python benchmarks/bench.py --quick --repeats 5 --scaling 8 --scaling 128 --scaling 1000 \
               --max-resident 128 --doc docs/benchmarks.md --readme README.md ;;
    load) python benchmarks/load_server.py --requests 200 --compare-requests 24 --max-tokens 16 --doc docs/server.md
      python benchmarks/chunked_prefill.py --repeats 3 --doc docs/benchmarks.md
      python benchmarks/chunked_prefill.py --first-batch --chunks 64,256,one-shot --repeats 3 --max-tokens 16 \
        --doc docs/benchmarks.md ;;
    soak) python benchmarks/soak_server.py --requests 3000 --cycle-every 250 --max-tokens 8 --doc docs/server.md ;;
    ray)
      python benchmarks/ray_serve.py --doc docs/scale-out.md
      python benchmarks/ray_serve.py --max-batch 4 --tag batch4 --doc docs/scale-out.md
      python benchmarks/ray_serve.py --no-plain --replicas 2 --adapters-per-replica 4 --tag spread --doc docs/scale-out.md
      python benchmarks/ray_serve.py --route-cost --doc docs/scale-out.md ;;
    bigbench)
      loraswitch data bigbench --router-data "${TMPDIR:-/tmp}/bigbench_router_data" --per-task 200
      # each step resumes: rerun the command after an interruption and only what is missing runs
      loraswitch zoo eval --library bigbench --n 50 --resume --doc docs/real-tasks.md || true   # exit 1 = an adapter under the bar
      loraswitch train-router --library bigbench --router seq --data "${TMPDIR:-/tmp}/bigbench_router_data"
      loraswitch train-router --library bigbench --router gate --data "${TMPDIR:-/tmp}/bigbench_router_data"
      python benchmarks/routing_probe.py --library bigbench --doc docs/routing.md
      python benchmarks/segmentation.py --library bigbench --singles 20 --layout-prompts 3 --heldout-singles 20
      python benchmarks/growing_library.py --library bigbench --doc docs/routing.md
      python benchmarks/growing_cascade.py --library bigbench --doc docs/routing.md
      loraswitch eval --library bigbench --limit 10 --composite-limit 3 --resume --out benchmarks/results/eval_bigbench \
        --doc docs/real-tasks.md ;;
    *) echo "unknown step $step (zoo, eval, routing, bench, load, soak, ray, bigbench)" >&2; exit 2 ;;
  esac
done
