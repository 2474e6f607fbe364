"""The methods the harness compares, one small class each, behind a registry.

| family    | methods                                         | how it answers                                  |
|-----------|-------------------------------------------------|-------------------------------------------------|
| reference | `base`, `oracle`                                | no adapter; the true task's adapter             |
| router    | `auto`, `seq`, `arrow`, `gate`                  | `Switch.chat(model="auto", route=...)`          |
| merge     | `merge_<method>` (loraswitch.merging)           | all adapters merged into one copy of the base   |
| peft      | `peft_linear/ties/dare_ties/cat/xlora/arrow`    | PEFT on a fresh copy of the base (peft_baselines)|

A method gets the shared `EvalContext` (base factory, adapter folders, routers, batching) and
answers a list of `Item`s with one `Generation` each. `setup` may build models (not timed with the
answers); `close` frees them. Merge methods are discovered from `loraswitch.merging` at call
time, so a method registered there is evaluated here without further changes.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from loraswitch.base import Base
from loraswitch.eval.data import Item
from loraswitch.eval.suite import Suite
from loraswitch.generate import Generation, SamplingParams
from loraswitch.library import Adapter, scan
from loraswitch.switch.parts import assemble, parts_pool, pooled_lengths


@dataclass
class EvalContext:
    """What every method shares. `base_factory()` must return a NEW base model each call
    (the engine wraps layers in place; PEFT and merges need untouched weights)."""

    base_factory: Callable[[], Base]
    adapter_dirs: list[Path]
    tasks: list[str]
    router_dir: Path | None = None
    batch_size: int = 16
    quick: bool = False
    progress: Callable[[int], None] = lambda n: None  # called with the number of items just answered
    scratch: Path | None = None  # a temporary folder (harmonised adapters for PEFT)
    xlora_train_per_adapter: int = 40  # the gate router's budget (train-router: per_adapter // 5)
    xlora_epochs: int = 3
    suite: Suite | None = None  # the evaluated suite (validation and training prompts for merges, X-LoRA)
    _switch: object | None = field(default=None, repr=False)

    def switch(self):
        """The shared Switch: one base with every adapter loaded (base, oracle and routers)."""
        if self._switch is None:
            from loraswitch.switch import Switch

            self._switch = Switch(self.base_factory(), self.adapter_dirs, self.router_dir)
        return self._switch

    def read_adapters(self, base: Base) -> list[Adapter]:
        """The library's adapters, validated against `base` (refusals are skipped, as the engine does)."""
        return scan(self.adapter_dirs, base.model, base.name).adapters


class Method:
    name = ""
    family = ""
    routes = False  # routing accuracy / abstain rate apply
    needs_oos = False  # answers out-of-suite prompts (only meaningful for routers)

    def __init__(self, ctx: EvalContext):
        self.ctx = ctx
        self.info: dict = {}

    def setup(self) -> None:
        pass

    def answer(self, items: list[Item]) -> list[Generation]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def chat_items(ctx: EvalContext, switch, items: list[Item], model: str, route: str | None = None) -> list[Generation]:
    """Answer items through `Switch.chat` in batches of equal max_new_tokens; keeps item order."""
    out: list[Generation | None] = [None] * len(items)
    by_len: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        by_len.setdefault(item.max_new_tokens, []).append(i)
    for n_new, idx in by_len.items():
        params = SamplingParams(max_new_tokens=n_new)
        for j in range(0, len(idx), ctx.batch_size):
            chunk = idx[j : j + ctx.batch_size]
            gens = switch.chat([items[i].prompt for i in chunk], model=model, route=route, params=params)
            for i, g in zip(chunk, gens):
                out[i] = g
            ctx.progress(len(chunk))
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class MethodSpec:
    name: str
    family: str
    factory: Callable[[EvalContext], Method]
    description: str = ""


# ---------------------------------------------------------------------------- reference
class BaseMethod(Method):
    name, family = "base", "reference"

    def answer(self, items: list[Item]) -> list[Generation]:
        return chat_items(self.ctx, self.ctx.switch(), items, "base")


class OracleMethod(Method):
    name, family = "oracle", "reference"

    def answer(self, items: list[Item]) -> list[Generation]:
        switch = self.ctx.switch()
        missing = sorted({t for it in items for t in ([it.task] if it.task else [p.task for p in it.parts])} - set(switch.engine.names))
        if missing:
            raise RuntimeError(f"no adapter loaded for task(s) {missing}")
        # every prompt to answer (single tasks, and each part of each composite) grouped by task
        jobs: list[tuple[int, int, str, str, int]] = []  # (item index, part index or -1, task, prompt, max tokens)
        pools: dict[int, int] = {}  # composite item index -> the new tokens its parts share
        for i, it in enumerate(items):
            if it.parts:
                pools[i] = parts_pool(switch.base.tokenizer, it.max_new_tokens, len(it.parts))  # as `auto`'s rows share them
                jobs += [(i, j, p.task, p.prompt, pools[i]) for j, p in enumerate(it.parts)]
            else:
                jobs.append((i, -1, it.task, it.prompt, it.max_new_tokens))
        results: dict[tuple[int, int], Generation] = {}
        for task in sorted({j[2] for j in jobs}):
            mine = [j for j in jobs if j[2] == task]
            sub = [Item(f"{j[0]}/{j[1]}", "task", j[3], j[4], task) for j in mine]
            progress, self.ctx.progress = self.ctx.progress, lambda n: None
            try:
                answers = chat_items(self.ctx, switch, sub, task)
            finally:
                self.ctx.progress = progress
            for j, a in zip(mine, answers):
                results[(j[0], j[1])] = a
        out = []
        for i, it in enumerate(items):
            if not it.parts:
                out.append(results[(i, -1)])
            else:
                parts = _pooled([results[(i, j)] for j in range(len(it.parts))], switch.base.tokenizer, pools[i])
                answers = [replace(a, trace=a.trace[: len(a.token_ids)],
                                   routing={"router": "oracle", "adapter": p.task, "confidence": 1.0})
                           for a, p in zip(parts, it.parts)]
                out.append(assemble(switch.base.tokenizer, answers, "oracle"))
            self.ctx.progress(1)
        return out


def _pooled(parts: list[Generation], tokenizer, pool: int) -> list[Generation]:
    """The oracle's parts, each answered alone with the whole pool, cut to what each keeps when
    the parts share the pool as `auto`'s rows do (`switch.parts.pooled_lengths`)."""
    kept = pooled_lengths([len(a.token_ids) for a in parts], [a.finish_reason == "stop" for a in parts], pool)
    out = []
    for a, k in zip(parts, kept):
        if k < len(a.token_ids):
            a = replace(a, token_ids=a.token_ids[:k], text=tokenizer.decode(a.token_ids[:k], skip_special_tokens=True),
                        trace=a.trace[:k], logprobs=a.logprobs[:k], finish_reason="length")
        out.append(a)
    return out


# ---------------------------------------------------------------------------- routers
class RouterMethod(Method):
    family = "router"
    routes = True
    needs_oos = True

    def setup(self) -> None:
        switch = self.ctx.switch()
        router = switch.router(self.name)  # raises when a trained router is missing or stale
        self.info["router"] = type(router).__name__
        note = getattr(router, "note", "")
        if note:
            self.info["note"] = note

    def answer(self, items: list[Item]) -> list[Generation]:
        return chat_items(self.ctx, self.ctx.switch(), items, "auto", self.name)


class GateMeteoraMethod(RouterMethod):
    """MeteoRA's recipe on our gates, for comparison with `gate` on the same prompts: every layer
    routes every token to its top-2, softmax at a temperature hand-set per composite size
    (MeteoRA's 15 / 20 / 30 for 3 / 5 / 10 parts; 1 for everything else). One pass per prompt."""

    name = "gate_meteora"
    TEMPERATURE = {3: 15.0, 5: 20.0, 10: 30.0}

    def setup(self) -> None:
        self.ctx.switch().router("gate")  # raises when the gates are missing or stale
        self.info["router"] = "GateRouter(mode=token, top_k=2, temperature per composite size)"

    def answer(self, items: list[Item]) -> list[Generation]:
        from loraswitch.generate import generate

        switch, out = self.ctx.switch(), [None] * len(items)
        groups: dict[tuple[float, int], list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault((self.TEMPERATURE.get(len(it.parts), 1.0), it.max_new_tokens), []).append(i)
        for (temperature, n_new), idx in groups.items():
            router = switch.router("gate").variant(mode="token", top_k=2, temperature=temperature)
            for j in range(0, len(idx), self.ctx.batch_size):
                chunk = idx[j : j + self.ctx.batch_size]
                prompts = [items[i].prompt for i in chunk]
                gens = generate(switch.engine, [switch.base.chat_ids(p) for p in prompts],
                                router.policy(switch.engine, prompts), SamplingParams(max_new_tokens=n_new))
                for i, g in zip(chunk, gens):
                    out[i] = g
                self.ctx.progress(len(chunk))
        return out  # type: ignore[return-value]


ROUTER_METHODS = [
    MethodSpec(name, "router", type(f"{name.title()}Router", (RouterMethod,), {"name": name}), desc)
    for name, desc in [("auto", "loraswitch auto: seq per prompt, part by part on composites (arrow if seq is missing)"),
                       ("seq", "sequence-level selector (one adapter per prompt, abstains)"),
                       ("arrow", "Arrow: zero-shot per-token, per-layer routing from adapter weights"),
                       ("gate", "learned gates: the prompt read per token, one adapter held per answer part")]
] + [MethodSpec("gate_meteora", "router", GateMeteoraMethod,
                "MeteoRA's recipe on the same gates: per-token, per-layer top-2, temperature per composite size")]
REFERENCE_METHODS = [
    MethodSpec("base", "reference", BaseMethod, "the base model, no adapter"),
    MethodSpec("oracle", "reference", OracleMethod, "the true task's adapter; composites: each part alone with its own adapter"),
]


# ---------------------------------------------------------------------------- merges
SUM_METHODS = ("linear", "dare_linear", "adamerging", "cat")


def merge_weights(method: str, n: int) -> list[float]:
    """Equal weights: 1/n for the methods that add the updates (linear, dare_linear, cat,
    adamerging's initial coefficients: an average), 1.0 for the disjoint-mean family (ties,
    dare_ties, pcb), whose merge already averages the entries that agree."""
    return [1.0 / n] * n if method in SUM_METHODS else [1.0] * n


def fold_deltas(base: Base, deltas: dict[str, torch.Tensor]) -> None:
    """W += dW for every merged module, in place on `base` (a fresh copy)."""
    with torch.no_grad():
        for key, d in deltas.items():
            w = base.model.get_submodule(key).weight
            w.add_(d.to(w.dtype).to(w.device))


class MergeMethod(Method):
    family = "merge"

    def __init__(self, ctx: EvalContext, method: str):
        super().__init__(ctx)
        self.method = method
        self.name = f"merge_{method}"
        self.switch = None

    def setup(self) -> None:
        from loraswitch.merging.merge import merge_deltas
        from loraswitch.switch import Switch

        base = self.ctx.base_factory()
        adapters = self.ctx.read_adapters(base)  # the whole library, whatever tasks are evaluated
        weights = merge_weights(self.method, len(adapters))
        t0 = time.perf_counter()
        if self.method == "adamerging":
            from loraswitch.merging.config import AdapterSpec, MergeConfig
            from loraswitch.merging.merge import run_merge

            n = 4 if self.ctx.quick else 16
            params = {"steps": 10} if self.ctx.quick else {}
            # unlabeled prompts of the evaluated tasks (validation split): AdaMerging takes them as a parameter
            params["prompts"] = [e.prompt for t in self.ctx.tasks for e in self.ctx.suite.examples(t, "val", n)]
            cfg = MergeConfig("adamerging", [AdapterSpec(a.name, w) for a, w in zip(adapters, weights)], params)
            result = run_merge(cfg, base, adapters, progress=False)
            deltas = result.deltas
            self.info["coefficients"] = result.adamerging.get("coefficients") if result.adamerging else None
        else:
            deltas = merge_deltas(adapters, weights, self.method)
        fold_deltas(base, deltas)
        self.info.update({"adapters": [a.name for a in adapters], "weights": weights,
                          "merge_s": round(time.perf_counter() - t0, 2)})
        self.switch = Switch(base, adapter_dirs=[])

    def answer(self, items: list[Item]) -> list[Generation]:
        return chat_items(self.ctx, self.switch, items, "base")

    def close(self) -> None:
        self.switch = None
        gc.collect()
