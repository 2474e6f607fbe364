"""Running every configuration on one model, and a whole benchmark to JSON, markdown and a plot."""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import os
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
from loraswitch.bench.limit import matvec_limit
from loraswitch.bench.measure import (
    Runner,
    Timing,
    hf_generate,
    hf_timing,
    interleaved,
    lean_generate,
    limit_malloc_caching,
    ls_compiled,
    ls_generate,
)
from loraswitch.bench.profiling import profile_kernels
from loraswitch.bench.report import markdown, plot_scaling, sanity, targets
from loraswitch.engine import Engine
from loraswitch.generate import NO_ADAPTER, FixedPolicy, Policy
from loraswitch.library import Adapter


def _write_peft(adapters: list[Adapter], folder: Path, model: nn.Module) -> dict[str, Path]:
    from loraswitch.eval.peft_baselines import harmonise

    return harmonise(adapters, folder, model)


def bench_model(name: str, cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Every configuration of one model at every batch size, timed round-robin (`interleaved`),
    then the adapters-loaded sweep."""
    device = torch.device(cfg.device)
    want = set(cfg.configs)
    out: dict = {"model": name, "batches": {}, "scaling": {}}
    base = make_base(name, device, getattr(torch, cfg.dtype), cfg.seed)
    mc = base.model.config
    out["shape"] = {"hidden": mc.hidden_size, "layers": mc.num_hidden_layers, "intermediate": mc.intermediate_size,
                    "params_m": round(sum(p.numel() for p in base.model.parameters()) / 1e6, 1)}
    adapters = random_adapters(base.model, max(cfg.n_mixed, 8), cfg.rank, cfg.seed)
    out["adapter_mb"] = round(nbytes([t for m in adapters[0].modules.values() for t in (m.A, m.B)]) / 2**20, 2)
    g = torch.Generator().manual_seed(cfg.seed)
    prompts = {b: torch.randint(3, 30000, (b, cfg.prompt_len), generator=g) for b in cfg.batch_sizes}
    runners: dict[int, dict[str, Runner]] = {b: {} for b in cfg.batch_sizes}

    def add(b: int, config: str, fn: Callable[[], Timing], warmup: bool = True, **extra) -> None:
        if config in want and (b != 1 or cfg.batch1_configs is None or config in cfg.batch1_configs):
            runners[b][config] = Runner(fn, warmup, extra or None)

    with tempfile.TemporaryDirectory(prefix="loraswitch-bench-") as tmp:
        peft_paths = _write_peft(adapters[: cfg.n_mixed], Path(tmp), base.model) if want & {
            "peft_single", "peft_mixed", "peft_arrow", "peft_xlora"} else {}
        # plain copies in the lean loop: the base model, and one adapter folded in (the limit);
        # copies, because the engine below wraps `base.model` in place
        keep: list[nn.Module] = [copy.deepcopy(base.model), _merged_copy(base.model, adapters[0])]
        for b, ids in prompts.items():
            add(b, "base", partial(lean_generate, keep[0], ids, cfg.new_tokens, device))
            add(b, "merged", partial(lean_generate, keep[1], ids, cfg.new_tokens, device))
            if b == 1:
                add(b, "hf_generate", partial(hf_generate, keep[0], ids, cfg.new_tokens, device))
        if peft_paths:  # each PEFT model on a copy of its own
            keep += _peft_runners(base, peft_paths, prompts, cfg, device, add)
        engine = Engine(base)
        # random prompts share no opening, so the prefix cache would serve nothing here; its kept
        # candidates would only add to the memory column (the server's bound is its --prefix-cache)
        engine.prefix_tokens = 0
        for a in adapters[: cfg.n_mixed]:
            engine.add_adapter(a)
        slots = [engine.slot_of(a.name) for a in adapters[: cfg.n_mixed]]
        for b, ids in prompts.items():
            for config, factory in _ls_policies(engine, slots, [a.name for a in adapters[: cfg.n_mixed]], b, cfg).items():
                add(b, config, partial(ls_generate, engine, ids, cfg.new_tokens, factory, device))
            one = partial(FixedPolicy, [([slots[0]], [1.0])] * b)
            add(b, "ls_compiled", partial(ls_compiled, engine, cfg.compile_backend, ids, cfg.new_tokens, one, device))
            spread = partial(FixedPolicy, [([slots[i % len(slots)]], [1.0]) for i in range(b)])
            add(b, "ls_compiled_mixed", partial(ls_compiled, engine, cfg.compile_backend, ids, cfg.new_tokens, spread, device))
            bare = partial(FixedPolicy, [NO_ADAPTER] * b)  # the compiled step's own no-adapter reference
            add(b, "ls_compiled_base", partial(ls_compiled, engine, cfg.compile_backend, ids, cfg.new_tokens, bare, device))
            top1 = partial(RandomTokenPolicy, slots, 1, b, cfg.prompt_len, cfg.new_tokens, cfg.seed + 1)  # ls_token_top1's
            add(b, "ls_compiled_token_top1", partial(ls_compiled, engine, cfg.compile_backend, ids, cfg.new_tokens, top1, device))
        for b in cfg.batch_sizes:
            ordered = {c: runners[b][c] for c in CONFIGS if c in runners[b]}  # the documented order
            out["batches"][str(b)] = interleaved(ordered, cfg.repeats, device, lambda s, b=b: log(f"{name} b={b} {s}"))
        if cfg.limit:  # after the timed runs, in the same conditions
            log(f"{name} matvec limit")
            out["limit"] = matvec_limit(keep[0], device=device)
        out["compile"] = _compile_info(engine, cfg)
        del keep
        gc.collect()
        out["adapter_stack_mb_8"] = round(engine_adapter_bytes(engine) / 2**20, 1)
        if cfg.scaling:  # with the number of adapters loaded (same engine, adapters added)
            out["scaling"] = _bench_scaling(engine, base, adapters, prompts, cfg, device, lambda s: log(f"{name} {s}"))
        if cfg.profile:
            out["profile"] = profile_kernels(engine, prompts[max(prompts)], slots, cfg, device)
    return out


def _compile_info(engine: Engine, cfg: BenchConfig) -> dict | None:
    """What compiling the decode step cost: seconds of the first (compiling) call per
    (batch, cache length, choices per token), or why it fell back to eager."""
    dec = engine.decoder
    if dec is None:
        return None
    return {"backend": cfg.compile_backend, "failed": dec.failed,
            "first_call_s": {"x".join(map(str, k)): v for k, v in dec.compile_s.items()}}


def _ls_policies(engine: Engine, slots: list[int], names: list[str], b: int, cfg: BenchConfig) -> dict[str, Callable[[], Policy]]:
    """loraswitch's configurations for a batch of `b` rows: how each one routes."""
    want = set(cfg.configs)
    factories: dict[str, Callable[[], Policy]] = {
        "ls_base": partial(FixedPolicy, [NO_ADAPTER] * b),  # the loop's and the layers' own cost, nothing routed
        "ls_explicit": partial(FixedPolicy, [([slots[0]], [1.0])] * b),
        "ls_mixed": partial(FixedPolicy, [([slots[i % len(slots)]], [1.0]) for i in range(b)]),
        "ls_token_top1": partial(RandomTokenPolicy, slots, 1, b, cfg.prompt_len, cfg.new_tokens, cfg.seed + 1),
        "ls_token_top2": partial(RandomTokenPolicy, slots, 2, b, cfg.prompt_len, cfg.new_tokens, cfg.seed + 2),
        "ls_dense": partial(FixedPolicy, [(slots, [1.0 / len(slots)] * len(slots))] * b),
    }
    if "ls_seq" in want:
        words = ["convert", "date", "sort", "numbers", "spell", "french", "review", "json", "add", "reverse"]
        texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(i % 5 + 3)) for i in range(b)]
        factories["ls_seq"] = partial(SeqRouterPolicy, engine, random_seq_router(engine, names, cfg.seed), texts)
    if "ls_arrow" in want:
        from loraswitch.routing.arrow import ArrowRouter

        factories["ls_arrow"] = partial(ArrowRouter(engine, top_k=1).policy, engine, [""] * b)
    return factories


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
    engine.limit_resident(cfg.max_resident)  # None: every adapter in the stacks
    pool = list(adapters)
    loaded = 0
    for n in sorted(cfg.scaling):
        if n > len(pool):
            pool += random_adapters(base.model, n - len(pool), cfg.rank, cfg.seed, start=len(pool))
        for a in pool[loaded:n]:
            engine.add_adapter(a)
        loaded = max(loaded, n)
        use = [engine.slot_of(a.name) for a in pool[: min(cfg.n_mixed, n)]]
        entry: dict = {"adapter_stack_mb": round(engine_adapter_bytes(engine) / 2**20, 1), "resident": len(engine.slots)}
        for b, ids in prompts.items():
            if b == 1 and cfg.batch1_configs is not None:
                continue  # a quick run's batch 1 is the single-stream table only
            log(f"b={b} scaling n={n}")
            factory = partial(FixedPolicy, [([use[i % len(use)]], [1.0]) for i in range(b)])
            runner = Runner(partial(ls_generate, engine, ids, cfg.new_tokens, factory, device))
            entry[str(b)] = interleaved({"ls_mixed": runner}, cfg.repeats, device)["ls_mixed"]
        out[str(n)] = entry
    engine.limit_resident(None)
    return out


def _peft_runners(base: Base, paths: dict[str, Path], prompts: dict[int, torch.Tensor], cfg: BenchConfig,
                  device: torch.device, add: Callable[..., None]) -> list[nn.Module]:
    """Register PEFT's configurations (unmerged single adapter, `adapter_names` mixed batch, Arrow,
    X-LoRA), each on its own copy of the base; returns the models, to keep them alive until timed."""
    from peft import PeftModel

    names = list(paths)
    want = set(cfg.configs)
    models: list[nn.Module] = []
    if want & {"peft_single", "peft_mixed"}:
        model = PeftModel.from_pretrained(copy.deepcopy(base.model), str(paths[names[0]]), adapter_name=names[0]).eval()
        for n in names[1:]:
            model.load_adapter(str(paths[n]), adapter_name=n)
        model.set_adapter(names[0])
        models.append(model)
        for b, ids in prompts.items():
            add(b, "peft_single", partial(lean_generate, model, ids, cfg.new_tokens, device))
            rows = [names[i % len(names)] for i in range(b)]
            add(b, "peft_mixed", partial(lean_generate, model, ids, cfg.new_tokens, device, {"adapter_names": rows}))
    if "peft_arrow" in want:
        from peft import ArrowConfig
        from peft.tuners.lora.arrow import create_arrow_model

        model = create_arrow_model(copy.deepcopy(base.model), [str(p) for p in paths.values()],
                                   ArrowConfig(top_k=3, router_temperature=1.0, rng_seed=0)).eval()
        models.append(model)
        for b, ids in prompts.items():
            add(b, "peft_arrow", partial(lean_generate, model, ids, cfg.new_tokens, device), top_k=3)
    if "peft_xlora" in want:
        from peft import XLoraConfig, get_peft_model

        m = copy.deepcopy(base.model)
        m.config.use_cache = False
        xcfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=m.config.hidden_size, xlora_depth=1,
                           adapters={str(i): str(p) for i, p in enumerate(paths.values())})
        model = get_peft_model(m, xcfg).eval()
        models.append(model)
        for b, ids in prompts.items():
            add(b, "peft_xlora", partial(hf_timing, model, ids, cfg.xlora_new_tokens, device), warmup=False,
                new_tokens=cfg.xlora_new_tokens, note="no KV cache; one run, no warm-up; decode = all new tokens / total time")
    return models


def pin_threads() -> list[int] | None:
    """Pin the process to as many cores as torch uses threads (the first ones it may run on), so
    the scheduler does not move the timed threads around between runs."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))[: torch.get_num_threads()]
    os.sched_setaffinity(0, cores)
    return cores


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Run every model's benchmark and write JSON, markdown and the scaling plot to `cfg.out_dir`."""
    limit_malloc_caching()
    cores = pin_threads()
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch.cuda.is_available() is False")
    res = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": cfg.device, "platform": platform.platform(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cores": cores,
           "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}, "models": []}
    if cfg.device.startswith("cuda"):
        res["gpu"] = torch.cuda.get_device_name()
    for name in cfg.models:
        t0 = time.perf_counter()
        try:
            m = bench_model(name, cfg, log)
            m["sanity"] = sanity(m, cfg)
            m["targets"] = targets(m, cfg)
        except Exception as exc:
            m = {"model": name, "error": f"{type(exc).__name__}: {exc}"}
        m["wall_s"] = round(time.perf_counter() - t0, 1)
        res["models"].append(m)
    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_results(res, Path(cfg.out_dir))
    return res


def write_results(res: dict, out: Path) -> None:
    """JSON, markdown and the scaling plot of a run into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{res['device'].split(':')[0]}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(res))
    plot_scaling(res, out / f"{stem}_scaling.png")


def rejudge(res: dict) -> dict:
    """A saved run's sanity checks and targets computed again by the current report code (new
    targets, spreads, goals), from its own measurements: nothing is re-timed."""
    fields = {f.name for f in dataclasses.fields(BenchConfig)}
    cfg = BenchConfig(**{k: v for k, v in res["config"].items() if k in fields})
    for m in res["models"]:
        if "error" not in m:
            m["sanity"] = sanity(m, cfg)
            m["targets"] = targets(m, cfg)
    return res


