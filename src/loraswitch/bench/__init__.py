"""`loraswitch bench` (and `benchmarks/bench.py`): speed and memory of loraswitch against the
merged-weights limit and PEFT, as ratios measured in ONE process (machines are noisy).

For each model (the default SmolLM2-135M in fp32, and random-weight Llama configurations) and
batch size, every configuration prefills the same random prompts and greedily decodes the same
number of new tokens; prefill and decode tokens/s are taken from the best of `repeats` timed runs,
after one untimed warm-up run that also measures peak memory (resident-set growth sampled every
millisecond on CPU, `torch.cuda.max_memory_allocated` on GPU).

Configurations (all adapters random, rank 8 on q,k,v,o,gate,up,down):

| name            | what runs                                                                        |
|-----------------|----------------------------------------------------------------------------------|
| base            | the base model, no adapter (the ceiling of any batch)                            |
| merged          | one adapter folded into the weights of a copy (the limit for one adapter)        |
| ls_explicit     | loraswitch, every row the same adapter (`model="<adapter>"`)                     |
| ls_mixed        | loraswitch, rows spread over 8 adapters (one adapter per request)                |
| ls_seq          | loraswitch, the sequence router (random weights) picks each row's adapter        |
| ls_token_top1/2 | loraswitch, fixed random per-token routing over 8 adapters, top-1 / top-2        |
| ls_arrow        | loraswitch, the Arrow router (per token and layer, top-1)                        |
| ls_dense        | loraswitch, every token mixes all 8 adapters (X-LoRA-like dense mixing)          |
| peft_single     | PEFT, one adapter, unmerged                                                      |
| peft_mixed      | PEFT, rows spread over 8 adapters with `adapter_names`                           |
| peft_arrow      | PEFT Arrow over 8 adapters (top-3, computes every expert densely)                |
| peft_xlora      | PEFT X-LoRA over 8 adapters (no KV cache: `xlora_new_tokens` only, via generate) |

loraswitch configurations run through `loraswitch.generate.generate` (the product's loop, with
its per-row routing bookkeeping); base, merged and PEFT run through a minimal greedy loop with
the same KV cache, so any loop overhead counts against loraswitch. Scaling: `ls_mixed` with 1,
8, 32 and 128 adapters loaded in one engine, requests spread over min(8, loaded) adapters.

Modules: `config` (what runs), `measure` (loops, timing, memory), `fixtures` (models, random
adapters, policies), `run` (one model, one benchmark), `report` (targets, markdown, plot),
`profiling` (torch profiler), `cli`.
"""

from __future__ import annotations

from loraswitch.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "bench_command": "cli",
    "CONFIGS": "config",
    "LLAMA_SHAPES": "config",
    "BenchConfig": "config",
    "bench_model": "run",
    "run_bench": "run",
})
