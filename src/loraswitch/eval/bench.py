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
"""

from __future__ import annotations

import copy
import ctypes
import gc
import json
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from loraswitch.base import Base, load_base
from loraswitch.engine import Engine
from loraswitch.generate import FixedPolicy, Policy, SamplingParams, generate
from loraswitch.library import Adapter, LoraModule

ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIGS = ("base", "merged", "ls_explicit", "ls_mixed", "ls_seq", "ls_token_top1", "ls_token_top2", "ls_arrow",
           "ls_dense", "peft_single", "peft_mixed", "peft_arrow", "peft_xlora")
# random-weight Llama shapes: name -> (hidden, layers, intermediate, heads, kv heads)
LLAMA_SHAPES = {"llama-tiny": (64, 2, 96, 4, 2), "llama-1024x16": (1024, 16, 2816, 16, 4), "llama-2048x16": (2048, 16, 5632, 16, 4),
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
    proto: bool = False  # also time the proposed kernel (ProtoKernel) on the mixed / token / dense paths
    seed: int = 0

    @classmethod
    def quick_config(cls, **overrides) -> BenchConfig:
        cfg = {"models": ["smollm2"], "batch_sizes": [16], "new_tokens": 16, "prompt_len": 32, "repeats": 2,
               "scaling": [8, 128], "xlora_new_tokens": 4}
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**cfg)


# ---------------------------------------------------------------------------- measuring
def _limit_malloc_caching() -> None:
    """Make glibc return large freed blocks to the OS (a fixed mmap threshold), so the resident
    set tracks what a configuration really holds and RSS growth per run means something."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB (also disables its dynamic growth)
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak RSS so far (kB on Linux, bytes on macOS)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory growth (bytes) inside the block: CUDA allocator stats, or sampled RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        gc.collect()
        self.start = _rss_bytes()
        self._max = self.start
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self._max = max(self._max, _rss_bytes())
                self._stop.wait(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self._max, _rss_bytes()) - self.start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    prefill_s: float
    decode_s: float
    prefill_tokens: int
    decode_tokens: int
    total_s: float = 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


@torch.inference_mode()
def lean_generate(model: nn.Module, ids: torch.Tensor, n_new: int, device: torch.device,
                  kwargs: dict | None = None) -> Timing:
    """The minimal greedy loop with a KV cache (for base, merged and PEFT): prefill, then
    n_new - 1 one-token forwards; no sampling options, no stop tokens, no bookkeeping."""
    kwargs = kwargs or {}
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    pos = torch.arange(ids.shape[1], device=device).expand_as(ids)
    cache = DynamicCache()
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1, **kwargs)
    tok = out.logits[:, -1].argmax(-1)
    _sync(device)
    t1 = time.perf_counter()
    nxt = pos[:, -1:] + 1
    for _ in range(n_new - 1):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=nxt, past_key_values=cache, use_cache=True,
                    **kwargs)
        tok = out.logits[:, -1].argmax(-1)
        nxt = nxt + 1
    _sync(device)
    t2 = time.perf_counter()
    return Timing(t1 - t0, t2 - t1, ids.numel(), ids.shape[0] * (n_new - 1), t2 - t0)


def ls_generate(engine: Engine, ids: torch.Tensor, n_new: int, policy_fn: Callable[[], Policy],
                device: torch.device) -> Timing:
    """loraswitch's own `generate`; prefill ends when the first token lands (`on_token`)."""
    prompts = ids.tolist()
    marks: list[float] = []

    def on_token(row, tok, entry):
        marks.append(time.perf_counter())

    policy = policy_fn()
    _sync(device)
    t0 = time.perf_counter()
    gens = generate(engine, prompts, policy, SamplingParams(max_new_tokens=n_new, stop_ids=set()), on_token)
    _sync(device)
    t_end = time.perf_counter()
    b = len(prompts)
    assert all(len(g.token_ids) == n_new for g in gens)
    first, last = marks[b - 1], marks[-1]  # the batch's first tokens come from the prefill
    return Timing(first - t0, last - first, ids.numel(), b * (n_new - 1), t_end - t0)


def hf_timing(model: nn.Module, ids: torch.Tensor, n_new: int, device: torch.device) -> Timing:
    """X-LoRA: `generate` without a KV cache; only the total is meaningful (reported as decode)."""
    ids = ids.to(device)
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                             min_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=False)
    _sync(device)
    dt = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + n_new
    return Timing(0.0, dt, 0, ids.shape[0] * n_new, dt)


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
    if _TOKENIZER is None:
        _TOKENIZER = load_base().tokenizer
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


class _SeqRouterPolicy(Policy):
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


# ---------------------------------------------------------------------------- one model
def _measure(run: Callable[[], Timing], repeats: int, device: torch.device, warmup: bool = True) -> dict:
    if warmup:
        with PeakMemory(device) as mem:  # warm-up run, measured for memory only
            run()
        runs = [run() for _ in range(repeats)]
    else:  # slow configurations (X-LoRA): one run, timed and measured
        with PeakMemory(device) as mem:
            runs = [run()]
    best_prefill = max(runs, key=lambda t: t.prefill_tps)
    best_decode = max(runs, key=lambda t: t.decode_tps)
    return {"prefill_tok_s": round(best_prefill.prefill_tps, 1), "decode_tok_s": round(best_decode.decode_tps, 2),
            "prefill_s": round(best_prefill.prefill_s, 4), "decode_s": round(best_decode.decode_s, 4),
            "total_s": round(min(r.total_s for r in runs), 4), "peak_mem_mb": round(mem.peak / 2**20, 1),
            "runs_decode_tok_s": [round(r.decode_tps, 2) for r in runs]}


def _with_proto(fn: Callable[[], Timing]) -> Timing:
    with ProtoKernel():
        return fn()


def _write_peft(adapters: list[Adapter], folder: Path, model: nn.Module) -> dict[str, Path]:
    from loraswitch.eval.peft_baselines import harmonise

    return harmonise(adapters, folder, model)


def bench_model(name: str, cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    want = set(cfg.configs)
    out: dict = {"model": name, "batches": {}, "scaling": {}}
    base = make_base(name, device, dtype, cfg.seed)
    mc = base.model.config
    out["shape"] = {"hidden": mc.hidden_size, "layers": mc.num_hidden_layers, "intermediate": mc.intermediate_size,
                    "params_m": round(sum(p.numel() for p in base.model.parameters()) / 1e6, 1)}
    n_load = max(cfg.n_mixed, 8)
    adapters = random_adapters(base.model, n_load, cfg.rank, cfg.seed)
    out["adapter_mb"] = round(nbytes([t for m in adapters[0].modules.values() for t in (m.A, m.B)]) / 2**20, 2)
    g = torch.Generator().manual_seed(cfg.seed)
    prompts = {b: torch.randint(3, 30000, (b, cfg.prompt_len), generator=g) for b in cfg.batch_sizes}
    results: dict[int, dict] = {b: {} for b in cfg.batch_sizes}

    def record(b: int, config: str, fn: Callable[[], Timing], force: bool = False, warmup: bool = True, **extra) -> None:
        if config not in want and not force:
            return
        log(f"{name} b={b} {config}")
        try:
            results[b][config] = {**_measure(fn, cfg.repeats, device, warmup), **extra}
        except Exception as exc:  # one failing configuration must not lose the others
            results[b][config] = {"error": f"{type(exc).__name__}: {exc}"}

    with tempfile.TemporaryDirectory(prefix="loraswitch-bench-") as tmp:
        peft_paths = _write_peft(adapters[: cfg.n_mixed], Path(tmp), base.model) if want & {
            "peft_single", "peft_mixed", "peft_arrow", "peft_xlora"} else {}

        # --- plain model: base, then one adapter folded in (the limit), in the lean loop
        for b, ids in prompts.items():
            record(b, "base", partial(lean_generate, base.model, ids, cfg.new_tokens, device))
        if "merged" in want:
            merged = copy.deepcopy(base.model)
            with torch.no_grad():
                for key, m in adapters[0].modules.items():
                    w = merged.get_submodule(key).weight
                    w.add_(m.delta().to(w.dtype).to(w.device))
            for b, ids in prompts.items():
                record(b, "merged", partial(lean_generate, merged, ids, cfg.new_tokens, device))
            del merged
            gc.collect()

        # --- PEFT (on a copy: the engine below wraps the base in place)
        if peft_paths:
            _bench_peft(base, peft_paths, prompts, cfg, device, record)

        # --- loraswitch
        engine = Engine(base)
        for a in adapters[: cfg.n_mixed]:
            engine.add_adapter(a)
        slots = [engine.slot_of(a.name) for a in adapters[: cfg.n_mixed]]
        names = [a.name for a in adapters[: cfg.n_mixed]]
        router = random_seq_router(engine, names, cfg.seed) if "ls_seq" in want else None
        from loraswitch.routing.arrow import ArrowRouter

        arrow = ArrowRouter(engine, top_k=1) if "ls_arrow" in want else None
        words = ["convert", "date", "sort", "numbers", "spell", "french", "review", "json", "add", "reverse"]
        for b, ids in prompts.items():
            texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(i % 5 + 3)) for i in range(b)]
            factories: dict[str, Callable[[], Policy]] = {
                "ls_explicit": partial(FixedPolicy, [([slots[0]], [1.0])] * b),
                "ls_mixed": partial(FixedPolicy, [([slots[i % len(slots)]], [1.0]) for i in range(b)]),
                "ls_token_top1": partial(RandomTokenPolicy, slots, 1, b, cfg.prompt_len, cfg.new_tokens, cfg.seed + 1),
                "ls_token_top2": partial(RandomTokenPolicy, slots, 2, b, cfg.prompt_len, cfg.new_tokens, cfg.seed + 2),
                "ls_dense": partial(FixedPolicy, [(slots, [1.0 / len(slots)] * len(slots))] * b),
            }
            if router is not None:
                factories["ls_seq"] = partial(_SeqRouterPolicy, engine, router, texts)
            if arrow is not None:
                factories["ls_arrow"] = partial(arrow.policy, engine, [""] * b)
            for config in CONFIGS:  # the documented order
                if config in factories:
                    record(b, config, partial(ls_generate, engine, ids, cfg.new_tokens, factories[config], device))
            if cfg.proto:
                for config in ("ls_mixed", "ls_token_top1", "ls_token_top2", "ls_dense"):
                    if config in factories and config in want:
                        record(b, f"{config}+proto", partial(_with_proto, partial(
                            ls_generate, engine, ids, cfg.new_tokens, factories[config], device)), force=True)
        out["adapter_stack_mb_8"] = round(engine_adapter_bytes(engine) / 2**20, 1)

        # --- scaling with the number of adapters loaded (same engine, adapters added)
        if cfg.scaling:
            for a in list(engine.adapters):
                engine.remove_adapter(a)
            pool = list(adapters)
            loaded = 0
            for n in sorted(cfg.scaling):
                if n > len(pool):
                    pool += random_adapters(base.model, n - len(pool), cfg.rank, cfg.seed, start=len(pool))
                for a in pool[loaded:n]:
                    engine.add_adapter(a)
                loaded = max(loaded, n)
                use = [engine.slot_of(a.name) for a in pool[: min(cfg.n_mixed, n)]]
                entry: dict = {"adapter_stack_mb": round(engine_adapter_bytes(engine) / 2**20, 1)}
                for b, ids in prompts.items():
                    log(f"{name} b={b} scaling n={n}")
                    factory = partial(FixedPolicy, [([use[i % len(use)]], [1.0]) for i in range(b)])
                    try:
                        entry[str(b)] = _measure(partial(ls_generate, engine, ids, cfg.new_tokens, factory, device),
                                                 cfg.repeats, device)
                    except Exception as exc:
                        entry[str(b)] = {"error": f"{type(exc).__name__}: {exc}"}
                out["scaling"][str(n)] = entry
            del pool
        if cfg.profile:
            out["profile"] = profile_kernels(engine, prompts[max(prompts)], slots, cfg, device)
    out["batches"] = {str(b): r for b, r in results.items()}
    return out


def _bench_peft(base: Base, paths: dict[str, Path], prompts: dict[int, torch.Tensor], cfg: BenchConfig,
                device: torch.device, record) -> None:
    from peft import PeftModel

    names = list(paths)
    want = set(cfg.configs)
    if want & {"peft_single", "peft_mixed"}:
        model = PeftModel.from_pretrained(copy.deepcopy(base.model), str(paths[names[0]]), adapter_name=names[0]).eval()
        for n in names[1:]:
            model.load_adapter(str(paths[n]), adapter_name=n)
        model.set_adapter(names[0])
        for b, ids in prompts.items():
            record(b, "peft_single", lambda ids=ids: lean_generate(model, ids, cfg.new_tokens, device))
            rows = [names[i % len(names)] for i in range(b)]
            record(b, "peft_mixed", lambda ids=ids, rows=rows: lean_generate(model, ids, cfg.new_tokens, device,
                                                                              {"adapter_names": rows}))
        del model
        gc.collect()
    if "peft_arrow" in want:
        from peft import ArrowConfig
        from peft.tuners.lora.arrow import create_arrow_model

        model = create_arrow_model(copy.deepcopy(base.model), [str(p) for p in paths.values()],
                                   ArrowConfig(top_k=3, router_temperature=1.0, rng_seed=0)).eval()
        for b, ids in prompts.items():
            record(b, "peft_arrow", lambda ids=ids: lean_generate(model, ids, cfg.new_tokens, device), top_k=3)
        del model
        gc.collect()
    if "peft_xlora" in want:
        from peft import XLoraConfig, get_peft_model

        m = copy.deepcopy(base.model)
        m.config.use_cache = False
        xcfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=m.config.hidden_size, xlora_depth=1,
                           adapters={str(i): str(p) for i, p in enumerate(paths.values())})
        model = get_peft_model(m, xcfg).eval()
        for b, ids in prompts.items():
            record(b, "peft_xlora", lambda ids=ids: hf_timing(model, ids, cfg.xlora_new_tokens, device), warmup=False,
                   new_tokens=cfg.xlora_new_tokens, note="no KV cache; one run, no warm-up; decode = all new tokens / total time")
        del model, m
        gc.collect()


# ---------------------------------------------------------------------------- a kernel proposal
class ProtoKernel:
    """A PROPOSED alternative to `kernels.add_lora` for mixed batches, measured side by side
    (`--proto`), never used by the product: per layer, the factors of the U distinct adapters in
    the batch are concatenated once ([U*r, in] and [out, U*r], cached while the batch's adapter
    set and the stacks are unchanged), and every token runs two dense GEMMs against them with a
    [T, U] weight mask computed once per Routing and shared by all layers:

        h = x @ A_u.T  ->  h *= mask (per token: its adapters' weights, 0 elsewhere)  ->  y += h @ B_u.T

    Three ops per layer instead of gather + two bmm + scale + index_add, no per-token copies of the
    factors, cost independent of how many adapters are loaded (only U matters)."""

    def __init__(self, max_unique: int = 16):
        import loraswitch.layers as layers_mod

        self.layers_mod = layers_mod
        self.original = layers_mod.add_lora
        self.max_unique = max_unique
        self.cache: dict = {}

    def __enter__(self) -> ProtoKernel:
        self.layers_mod.add_lora = self.add_lora
        return self

    def __exit__(self, *exc) -> None:
        self.layers_mod.add_lora = self.original
        self.cache.clear()

    def add_lora(self, y, x, A, B, ranks, routing):
        if torch.is_grad_enabled() or routing.uniform_slot() is not None:
            return self.original(y, x, A, B, ranks, routing)
        c = routing._cache
        if "proto" not in c:
            tok, sid, w = routing.pairs()
            uniq = torch.unique(sid)
            col = torch.searchsorted(uniq, sid)
            mask = torch.zeros(routing.n_tokens, len(uniq), dtype=w.dtype, device=w.device)
            mask.index_put_((tok, col), w, accumulate=True)
            c["proto"] = (uniq, tuple(uniq.tolist()), mask)
        uniq, key_slots, mask = c["proto"]
        if len(key_slots) > self.max_unique or len(key_slots) == 0:
            return self.original(y, x, A, B, ranks, routing)
        key = (A.data_ptr(), A._version, B._version, key_slots)
        factors = self.cache.get(key)
        if factors is None:
            if len(self.cache) > 4096:
                self.cache.clear()
            A_u = A.index_select(0, uniq).reshape(-1, A.shape[2])  # [U*r, in]
            B_u = B.index_select(0, uniq).permute(1, 0, 2).reshape(B.shape[1], -1)  # [out, U*r]
            factors = self.cache[key] = (A_u.T.contiguous(), B_u.T.contiguous())
        At, Bt = factors
        r = A.shape[1]
        h = (x @ At).view(x.shape[0], -1, r).mul_(mask.to(x.dtype).unsqueeze(-1)).view(x.shape[0], -1)
        return y.addmm_(h, Bt)


# ---------------------------------------------------------------------------- profiling
def profile_kernels(engine: Engine, ids: torch.Tensor, slots: list[int], cfg: BenchConfig, device: torch.device) -> dict:
    """Where decode time goes: torch profiler over `generate` for explicit, mixed and token-routed
    batches (top ops by self time), plus the share of time inside the LoRA kernel (`add_lora`)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import loraswitch.layers as layers_mod

    original = layers_mod.add_lora

    def traced(*args, **kwargs):
        with record_function("loraswitch.add_lora"):
            return original(*args, **kwargs)

    b = ids.shape[0]
    policies = {
        "ls_explicit": lambda: FixedPolicy([([slots[0]], [1.0])] * b),
        "ls_mixed": lambda: FixedPolicy([([slots[i % len(slots)]], [1.0]) for i in range(b)]),
        "ls_token_top1": lambda: RandomTokenPolicy(slots, 1, b, cfg.prompt_len, cfg.new_tokens, 1),
        "ls_dense": lambda: FixedPolicy([(slots, [1.0 / len(slots)] * len(slots))] * b),
    }
    out = {}
    layers_mod.add_lora = traced
    try:
        for name, fn in policies.items():
            ls_generate(engine, ids, 4, fn, device)  # warm
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                t = ls_generate(engine, ids, cfg.new_tokens, fn, device)
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events) or 1
            lora = next((e.cpu_time_total for e in events if e.key == "loraswitch.add_lora"), 0)
            top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
            out[name] = {
                "total_s": round(t.total_s, 3),
                "add_lora_share": round(lora / total, 3),
                "top_ops": [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1), "calls": e.count,
                             "share": round(e.self_cpu_time_total / total, 3)} for e in top],
            }
    finally:
        layers_mod.add_lora = original
    return out


# ---------------------------------------------------------------------------- targets & report
def _get(r: dict, b: int, config: str, key: str = "decode_tok_s") -> float | None:
    v = r.get("batches", {}).get(str(b), {}).get(config, {})
    return v.get(key) if isinstance(v, dict) else None


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a and b else None


def targets(model_result: dict, cfg: BenchConfig) -> list[dict]:
    """The project's speed targets, each with the measured ratio and met / NOT MET."""
    r = model_result
    out = []
    big = max(cfg.batch_sizes)
    for b in cfg.batch_sizes:
        for config, label in (("ls_seq", "sequence-routed"), ("ls_mixed", "one adapter per request"),
                              ("ls_token_top1", "token-routed (random)")):
            ratio = _ratio(_get(r, b, config), _get(r, b, "merged"))
            if ratio is not None:
                out.append({"target": f"top-1 {label} decode >= 0.9x merged weights (batch {b})", "ratio": ratio,
                            "goal": 0.9, "met": ratio >= 0.9})
    vs_peft = _ratio(_get(r, big, "ls_mixed"), _get(r, big, "peft_mixed"))
    ceiling = _ratio(_get(r, big, "base"), _get(r, big, "peft_mixed"))
    if vs_peft is not None:
        entry = {"target": f"{big} requests over {cfg.n_mixed} adapters >= 3x PEFT adapter_names decode", "ratio": vs_peft,
                 "goal": 3.0, "met": vs_peft >= 3.0, "ceiling": ceiling}
        out.append(entry)
        if ceiling is not None and ceiling < 3.0:
            vs_base = _ratio(_get(r, big, "ls_mixed"), _get(r, big, "base"))
            out.append({"target": f"(ceiling {ceiling}x < 3x) {big} requests over {cfg.n_mixed} adapters >= 0.9x the base model",
                        "ratio": vs_base, "goal": 0.9, "met": vs_base is not None and vs_base >= 0.9})
    sc = r.get("scaling", {})
    if "8" in sc and "128" in sc:
        for b in cfg.batch_sizes:
            t8 = sc["8"].get(str(b), {}).get("decode_tok_s")
            t128 = sc["128"].get(str(b), {}).get("decode_tok_s")
            cost = _ratio(t8, t128)  # time per token at 128 / at 8
            if cost is not None:
                out.append({"target": f"decode cost with 128 adapters loaded <= 1.2x with 8 (batch {b})", "ratio": cost,
                            "goal": 1.2, "met": cost <= 1.2, "lower_is_better": True})
    dense = _ratio(_get(r, big, "ls_dense"), _get(r, big, "peft_xlora"))
    if dense is not None:
        out.append({"target": f"dense mixing over {cfg.n_mixed} adapters >= 5x PEFT X-LoRA decode (batch {big})",
                    "ratio": dense, "goal": 5.0, "met": dense >= 5.0})
    return out


def markdown(res: dict) -> str:
    cfg = res["config"]
    lines = [f"# loraswitch benchmark ({res['device']})", "",
             f"{res['started']} on {res['platform']}, {res['torch_threads']} torch threads, torch {res['torch']}, "
             f"{cfg['dtype']}. Prompts of {cfg['prompt_len']} random tokens, greedy decoding of {cfg['new_tokens']} new tokens "
             f"(X-LoRA: {cfg['xlora_new_tokens']}), best of {cfg['repeats']} runs after a warm-up; random adapters of rank "
             f"{cfg['rank']} on q,k,v,o,gate,up,down; mixed batches spread over {cfg['n_mixed']} adapters. Tokens/s are "
             "batch totals. Ratios are within this one run.", ""]
    for m in res["models"]:
        if "error" in m:
            lines += [f"## {m['model']}: failed", "", f"`{m['error']}`", ""]
            continue
        s = m["shape"]
        lines += [f"## {m['model']} (hidden {s['hidden']}, {s['layers']} layers, {s['params_m']}M parameters; "
                  f"one adapter {m['adapter_mb']} MB)", ""]
        lines += ["### Targets", "", "| target | measured | goal | status |", "|---|---|---|---|"]
        for t in m.get("targets", []):
            status = "met" if t["met"] else "**NOT MET**"
            lines.append(f"| {t['target']} | {t['ratio']}x | {'<=' if t.get('lower_is_better') else '>='} {t['goal']}x | {status} |")
        lines.append("")
        for b, rows in m["batches"].items():
            lines += [f"### batch {b}", "", "| configuration | prefill tok/s | decode tok/s | decode vs merged | decode vs base | "
                      "peak memory growth (MB) |", "|---|---|---|---|---|---|"]
            merged = rows.get("merged", {}).get("decode_tok_s")
            basev = rows.get("base", {}).get("decode_tok_s")
            for name, r in rows.items():
                if "error" in r:
                    lines.append(f"| `{name}` | error: {r['error'][:80]} | | | | |")
                    continue
                pre = f"{r['prefill_tok_s']:.0f}" if r.get("prefill_tok_s") else "–"
                lines.append(f"| `{name}` | {pre} | {r['decode_tok_s']:.1f} | {_fmt(_ratio(r['decode_tok_s'], merged))} | "
                             f"{_fmt(_ratio(r['decode_tok_s'], basev))} | {r['peak_mem_mb']:.0f} |")
            lines.append("")
        if m.get("scaling"):
            bs = [b for b in m["batches"]]
            lines += ["### Adapters loaded (requests spread over min(8, loaded) adapters)", "",
                      "| adapters loaded | adapter stacks (MB) | " + " | ".join(f"decode tok/s b={b} | cost vs 8 b={b}" for b in bs) + " |",
                      "|---|---|" + "---|---|" * len(bs)]
            ref = m["scaling"].get("8", {})
            for n, e in m["scaling"].items():
                cells = []
                for b in bs:
                    v = e.get(b, {}).get("decode_tok_s")
                    cells += [f"{v:.1f}" if v else "–", _fmt(_ratio(ref.get(b, {}).get("decode_tok_s"), v))]
                lines.append(f"| {n} | {e['adapter_stack_mb']} | " + " | ".join(cells) + " |")
            lines.append("")
        if m.get("profile"):
            lines += ["### Profile of loraswitch decode (torch profiler, largest batch)", ""]
            for name, p in m["profile"].items():
                lines.append(f"- `{name}`: {p['total_s']} s, {100 * p['add_lora_share']:.0f}% inside `add_lora`; top ops: " +
                             ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in p["top_ops"][:6]))
            lines.append("")
    lines += ["Configurations: see `loraswitch.eval.bench` (module docstring). `merged` = one adapter folded into "
              "the weights (the limit for one adapter); `base` = no adapter (the ceiling for any batch). "
              "Peak memory growth: resident-set growth during a warm-up run (CPU) or CUDA peak allocation above "
              "the model's, i.e. activations, KV cache and kernel temporaries, not weights.", ""]
    return "\n".join(lines)


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.2f}x"


def plot_scaling(res: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in res["models"] if m.get("scaling")]
    if not models:
        return False
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        ns = sorted(int(n) for n in m["scaling"])
        for b in m["batches"]:
            ys = [m["scaling"][str(n)].get(b, {}).get("decode_tok_s") for n in ns]
            ax.plot(ns, [y or 0 for y in ys], marker="o", label=f"loraswitch, batch {b}")
            for config, style in (("merged", ":"), ("peft_mixed", "--")):
                v = m["batches"][b].get(config, {}).get("decode_tok_s")
                if v:
                    ax.axhline(v, linestyle=style, linewidth=1, color=ax.lines[-1].get_color(),
                               label=f"{config}, batch {b}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("adapters loaded")
        ax.set_ylabel("decode tokens/s (batch total)")
        ax.set_title(m["model"])
        ax.legend(fontsize=7)
    fig.suptitle(f"decode throughput vs adapters loaded ({res['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Run every model's benchmark and write JSON, markdown and the scaling plot to `cfg.out_dir`."""
    _limit_malloc_caching()
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch.cuda.is_available() is False")
    res = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": cfg.device, "platform": platform.platform(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}, "models": []}
    if cfg.device.startswith("cuda"):
        res["gpu"] = torch.cuda.get_device_name()
    for name in cfg.models:
        t0 = time.perf_counter()
        try:
            m = bench_model(name, cfg, log)
            m["targets"] = targets(m, cfg)
        except Exception as exc:
            m = {"model": name, "error": f"{type(exc).__name__}: {exc}"}
        m["wall_s"] = round(time.perf_counter() - t0, 1)
        res["models"].append(m)
    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{cfg.device.split(':')[0]}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(res))
    plot_scaling(res, out / f"{stem}_scaling.png")
    return res


def bench_command(
    models: Annotated[list[str] | None, typer.Option("--models", help="smollm2 and/or " + ", ".join(LLAMA_SHAPES) + " (repeatable or comma-separated).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    batch_sizes: Annotated[list[int] | None, typer.Option("--batch", help="Batch sizes (default 1 and 16).")] = None,
    new_tokens: Annotated[int | None, typer.Option(min=2)] = None,
    prompt_len: Annotated[int | None, typer.Option(min=1)] = None,
    repeats: Annotated[int | None, typer.Option(min=1, help="Timed runs per configuration (best is kept).")] = None,
    scaling: Annotated[list[int] | None, typer.Option("--scaling", help="Adapters loaded for the scaling study (default 1 8 32 128).")] = None,
    configs: Annotated[list[str] | None, typer.Option("--configs", help="Only these configurations: " + ", ".join(CONFIGS))] = None,
    quick: Annotated[bool, typer.Option("--quick", help="SmolLM2 only, batch 16, 16 new tokens, 8 vs 128 adapters.")] = False,
    profile: Annotated[bool, typer.Option("--profile", help="Also profile the loraswitch decode paths (torch profiler).")] = False,
    proto: Annotated[bool, typer.Option("--proto", help="Also time a proposed mixed-batch kernel (bench.ProtoKernel) beside the product's.")] = False,
    out: Annotated[Path, typer.Option("--out")] = Path("benchmarks/results"),
    doc: Annotated[Path | None, typer.Option("--doc", help="Also write the result tables into this markdown file (between generated markers), e.g. docs/benchmarks.md.")] = None,
) -> None:
    """Speed and memory: loraswitch vs one merged adapter, the base model and PEFT."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ.get("LORASWITCH_THREADS", os.cpu_count() or 1)))

    def split(values):
        return [v.strip() for s in values for v in str(s).split(",") if v.strip()] if values else None

    overrides = {"models": split(models), "device": device, "batch_sizes": batch_sizes, "new_tokens": new_tokens,
                 "prompt_len": prompt_len, "repeats": repeats, "scaling": scaling, "configs": split(configs),
                 "out_dir": out, "profile": profile, "proto": proto}
    cfg = BenchConfig.quick_config(**overrides) if quick else BenchConfig(**{k: v for k, v in overrides.items() if v is not None})
    bad = [c for c in cfg.configs if c not in CONFIGS]
    if bad:
        console.print(f"[red]error:[/red] unknown configuration(s) {bad}; known: {', '.join(CONFIGS)}")
        raise typer.Exit(2)
    try:
        with console.status("benchmarking...") as status:
            res = run_bench(cfg, lambda s: status.update(f"benchmarking {s}"))
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    for m in res["models"]:
        if "error" in m:
            console.print(f"[red]{m['model']} failed:[/red] {m['error']}")
            continue
        table = Table("target", "measured", "status", title=f"{m['model']} ({m['wall_s']} s)")
        for t in m["targets"]:
            table.add_row(t["target"], f"{t['ratio']}x", "[green]met[/green]" if t["met"] else "[red]NOT MET[/red]")
        console.print(table)
    stem = f"bench_{cfg.device.split(':')[0]}"
    console.print(f"wrote {out}/{stem}.json, {stem}.md, {stem}_scaling.png")
    if doc is not None:
        from loraswitch.eval.report import update_doc

        body = (Path(out) / f"{stem}.md").read_text() + f"\n![decode tokens/s vs adapters loaded]({stem}_scaling.png)\n"
        update_doc(doc, f"bench-{stem}", body, images_from=Path(out))
        console.print(f"updated {doc}")
    print(Path(out) / f"{stem}.json")
