"""What a benchmark run measures: models, batch sizes, configurations (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIGS = ("base", "merged", "hf_generate", "ls_base", "ls_explicit", "ls_compiled", "ls_compiled_base", "ls_compiled_mixed", "ls_compiled_token_top1", "ls_mixed", "ls_seq", "ls_token_top1", "ls_token_top2", "ls_arrow",
           "ls_dense", "peft_single", "peft_mixed", "peft_arrow", "peft_xlora")
# the single-stream table (batch 1) of a quick run: the limit, the baseline and the compiled step
SINGLE_CONFIGS = ("base", "merged", "hf_generate", "ls_base", "ls_explicit", "ls_compiled")
# random-weight Llama shapes: name -> (hidden, layers, intermediate, heads, kv heads); smollm2-shape
# is SmolLM2-135M's architecture with random weights (the same speed, no model files needed: GPU runs)
LLAMA_SHAPES = {"llama-tiny": (64, 2, 96, 4, 2), "smollm2-shape": (576, 30, 1536, 9, 3), "llama-1024x16": (1024, 16, 2816, 16, 4), "llama-2048x16": (2048, 16, 5632, 16, 4),
                "llama-4096x32": (4096, 32, 11008, 32, 8)}
console = Console(stderr=True)


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ["smollm2", "llama-1024x16"])
    device: str = "cpu"
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16])
    new_tokens: int = 32
    prompt_len: int = 64
    repeats: int = 2
    scaling: list[int] = field(default_factory=lambda: [1, 8, 32, 128])
    n_mixed: int = 8  # adapters the requests are spread over
    rank: int = 8
    xlora_new_tokens: int = 8
    configs: list[str] = field(default_factory=lambda: list(CONFIGS))
    out_dir: Path = Path("benchmarks/results")
    dtype: str = "float32"
    profile: bool = False
    seed: int = 0
    batch1_configs: list[str] | None = None  # None: every configuration at batch 1 too
    compile_backend: str = "inductor"  # torch.compile backend of `ls_compiled` ("eager" in the smoke test)
    limit: bool = True  # the matvec sweep (bench.limit): the batch-1 bandwidth ceiling
    # the scaling study's resident limit (`Engine.max_resident`, vLLM's max_loras): a library of
    # 1,000 rank-8 SmolLM2 adapters is 9.3 GB of fp32 factors in host memory, and as many again
    # in the layers' stacks if every one were resident
    max_resident: int | None = None

    @classmethod
    def quick_config(cls, **overrides) -> BenchConfig:
        cfg = {"models": ["smollm2"], "batch_sizes": [1, 16], "new_tokens": 16, "prompt_len": 32, "repeats": 3,
               "scaling": [8, 128], "xlora_new_tokens": 4, "batch1_configs": list(SINGLE_CONFIGS)}
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**cfg)


