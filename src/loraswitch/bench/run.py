"""Running every configuration on one model, and a whole benchmark to JSON, markdown and a plot."""

from __future__ import annotations

import copy
import gc
import json
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from torch import nn

from loraswitch.base import Base
from loraswitch.bench.config import CONFIGS, BenchConfig
from loraswitch.bench.fixtures import (
    RandomTokenPolicy,
    SeqRouterPolicy,
    engine_adapter_bytes,
    make_base,
    nbytes,
    random_adapters,
    random_seq_router,
)
from loraswitch.bench.measure import Timing, hf_timing, lean_generate, limit_malloc_caching, ls_generate, measure
from loraswitch.bench.profiling import profile_kernels
from loraswitch.bench.report import markdown, plot_scaling, targets
from loraswitch.engine import Engine
from loraswitch.generate import FixedPolicy, Policy
from loraswitch.library import Adapter


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
            results[b][config] = {**measure(fn, cfg.repeats, device, warmup), **extra}
        except Exception as exc:  # one failing configuration must not lose the others
            results[b][config] = {"error": f"{type(exc).__name__}: {exc}"}

    with tempfile.TemporaryDirectory(prefix="loraswitch-bench-") as tmp:
        peft_paths = _write_peft(adapters[: cfg.n_mixed], Path(tmp), base.model) if want & {
            "peft_single", "peft_mixed", "peft_arrow", "peft_xlora"} else {}

        # --- plain model: base, then one adapter folded in (the limit), in the lean loop
        for b, ids in prompts.items():
            record(b, "base", partial(lean_generate, base.model, ids, cfg.new_tokens, device))
        if "merged" in want:
            merged = _merged_copy(base.model, adapters[0])
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
                factories["ls_seq"] = partial(SeqRouterPolicy, engine, router, texts)
            if arrow is not None:
                factories["ls_arrow"] = partial(arrow.policy, engine, [""] * b)
            for config in CONFIGS:  # the documented order
                if config in factories:
                    record(b, config, partial(ls_generate, engine, ids, cfg.new_tokens, factories[config], device))
        out["adapter_stack_mb_8"] = round(engine_adapter_bytes(engine) / 2**20, 1)

        if cfg.scaling:  # with the number of adapters loaded (same engine, adapters added)
            out["scaling"] = _bench_scaling(engine, base, adapters, prompts, cfg, device, lambda s: log(f"{name} {s}"))
        if cfg.profile:
            out["profile"] = profile_kernels(engine, prompts[max(prompts)], slots, cfg, device)
    out["batches"] = {str(b): r for b, r in results.items()}
    return out


def _merged_copy(model: nn.Module, adapter: Adapter) -> nn.Module:
    """A copy of `model` with `adapter` folded into its weights: the speed limit for one adapter."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for key, m in adapter.modules.items():
            w = merged.get_submodule(key).weight
            w.add_(m.delta().to(w.dtype).to(w.device))
    return merged


def _bench_scaling(engine: Engine, base: Base, adapters: list[Adapter], prompts: dict[int, torch.Tensor], cfg: BenchConfig,
                   device: torch.device, log: Callable[[str], None]) -> dict[str, dict]:
    """`ls_mixed` decode with 1 ... N adapters loaded in `engine` (emptied first), requests spread
    over min(n_mixed, loaded) adapters: what a larger library costs per token."""
    out: dict[str, dict] = {}
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
            log(f"b={b} scaling n={n}")
            factory = partial(FixedPolicy, [([use[i % len(use)]], [1.0]) for i in range(b)])
            try:
                entry[str(b)] = measure(partial(ls_generate, engine, ids, cfg.new_tokens, factory, device),
                                         cfg.repeats, device)
            except Exception as exc:
                entry[str(b)] = {"error": f"{type(exc).__name__}: {exc}"}
        out[str(n)] = entry
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



def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Run every model's benchmark and write JSON, markdown and the scaling plot to `cfg.out_dir`."""
    limit_malloc_caching()
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


