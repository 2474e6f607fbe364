"""What a benchmark runs on: base models (the embedded default or random-weight Llamas), random
adapters, and the routing policies of the token-level and sequence-routed configurations."""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from loraswitch.base import Base, load_base
from loraswitch.bench.config import ALL_PROJ, LLAMA_SHAPES
from loraswitch.engine import Engine
from loraswitch.generate import FixedPolicy, Policy
from loraswitch.library import Adapter, LoraModule


# ---------------------------------------------------------------------------- models & adapters
def make_base(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Base:
    """A fresh base: "smollm2" (the embedded default) or a random-weight Llama from LLAMA_SHAPES."""
    if name == "smollm2":
        base = load_base(None, dtype=dtype)
    elif name in LLAMA_SHAPES:
        hidden, layers, inter, heads, kv = LLAMA_SHAPES[name]
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                          tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
        with torch.device(device):  # initialised where it runs: a 7B model's random init on CPU takes minutes
            model = LlamaForCausalLM(cfg).to(dtype).eval()
        model.requires_grad_(False)
        base = Base(model, _tokenizer(), name, "random")
    else:
        raise ValueError(f"unknown model {name!r}; choose smollm2 or one of {', '.join(LLAMA_SHAPES)}")
    base.model.to(device)
    return base


_TOKENIZER = None


def _tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:  # LORASWITCH_TOKENIZER: a saved tokenizer, where the embedded model is not installed (GPU)
        path = os.environ.get("LORASWITCH_TOKENIZER")
        _TOKENIZER = AutoTokenizer.from_pretrained(path) if path else load_base().tokenizer
    return _TOKENIZER


def random_adapters(model: nn.Module, n: int, rank: int, seed: int, start: int = 0) -> list[Adapter]:
    """`n` random LoRA adapters (rank `rank` on every q,k,v,o,gate,up,down; alpha = 2 rank)."""
    keys = [k for k, m in model.named_modules() if isinstance(m, nn.Linear) and k.rsplit(".", 1)[-1] in ALL_PROJ]
    dtype = next(model.parameters()).dtype
    out = []
    for i in range(start, start + n):
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        modules = {}
        for k in keys:
            lin = model.get_submodule(k)
            A = torch.randn(rank, lin.in_features, generator=g) / lin.in_features ** 0.5
            B = torch.randn(lin.out_features, rank, generator=g) * 0.02
            modules[k] = LoraModule(A.to(dtype), B.to(dtype), 2.0)
        out.append(Adapter(f"a{i:03d}", modules))
    return out


def smollm2_engine(n_adapters: int = 8, rank: int = 8, compile: bool | str = False) -> tuple[Engine, list[int]]:
    """The decode studies' set-up (benchmarks/cpu_kernel_ab.py, kv_cache_ab.py, compile_shapes.py):
    the embedded SmolLM2 in float32 on the CPU with `n_adapters` random adapters loaded, the
    prefix cache off; the engine and the adapters' slots."""
    base = make_base("smollm2", torch.device("cpu"), torch.float32, 0)
    engine = Engine(base, compile=compile)
    engine.prefix_tokens = 0
    for adapter in random_adapters(base.model, n_adapters, rank, 0):
        engine.add_adapter(adapter)
    return engine, [engine.slot_of(name) for name in engine.names]


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def engine_adapter_bytes(engine: Engine) -> int:
    return nbytes([t for layer in engine.layers.values() for t in (layer.A, layer.B)])


# ---------------------------------------------------------------------------- policies
class RandomTokenPolicy(Policy):
    """Fixed random per-token routing (top-k over `slots`), drawn before timing starts."""

    def __init__(self, slots: list[int], k: int, rows: int, prompt_len: int, n_new: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        n = len(slots)
        total = prompt_len + n_new + 1

        def draw():
            idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(total)])
            w = torch.softmax(torch.randn(total, k, generator=g), -1) if k > 1 else torch.ones(total, 1)
            return torch.tensor(slots)[idx], w

        self.ids, self.w = zip(*[draw() for _ in range(rows)])
        self.prompt_len = prompt_len

    def prompt_choice(self, row, prompt):
        return self.ids[row][: len(prompt)], self.w[row][: len(prompt)]

    def step_choice(self, row, generated):
        t = self.prompt_len + len(generated)
        return self.ids[row][t].tolist(), self.w[row][t].tolist()


def random_seq_router(engine: Engine, names: list[str], seed: int):
    """A sequence router with random weights: its decisions are arbitrary, its cost is real."""
    from loraswitch.routing.features import default_layer
    from loraswitch.routing.seq import NONE_CLASS, SequenceRouter

    hidden = engine.model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    classes = names + [NONE_CLASS]
    W = torch.randn(len(classes), 2 * hidden, generator=g)
    b = torch.zeros(len(classes))
    b[-1] = -1e4  # never abstain: the benchmark wants adapters applied
    return SequenceRouter(classes, W, b, torch.zeros(2 * hidden), torch.ones(2 * hidden), default_layer(engine),
                          temperature=1.0, threshold=0.0)


class SeqRouterPolicy(Policy):
    """Wraps the router so its decision (on the prompt text) is made inside the timed call."""

    def __init__(self, engine: Engine, router, texts: list[str]):
        self.engine, self.router, self.texts = engine, router, texts
        self.inner: FixedPolicy | None = None

    def start(self, engine, prompts):
        self.inner = self.router.policy(engine, self.texts)

    def prompt_choice(self, row, prompt):
        return self.inner.prompt_choice(row, prompt)

    def step_choice(self, row, generated):
        return self.inner.step_choice(row, generated)


