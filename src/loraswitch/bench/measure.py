"""Timing and memory: the greedy loops every configuration runs through, and peak-memory sampling.

loraswitch configurations run the product's own `generate`; base, merged and PEFT run a minimal
greedy loop with the same KV cache, so any loop overhead counts against loraswitch."""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from statistics import median

import torch
from torch import nn
from transformers import DynamicCache

from loraswitch.engine import Engine
from loraswitch.generate import Listener, Policy, SamplingParams, generate


# ---------------------------------------------------------------------------- measuring
def limit_malloc_caching() -> None:
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
    """loraswitch's own `generate`; prefill ends when the first token lands (its listener sees it)."""
    prompts = ids.tolist()
    marks: list[float] = []

    class Marks(Listener):
        def token(self, row, gen):
            marks.append(time.perf_counter())

    policy = policy_fn()
    _sync(device)
    t0 = time.perf_counter()
    gens = generate(engine, prompts, policy, SamplingParams(max_new_tokens=n_new, stop_ids=set()), Marks())
    _sync(device)
    t_end = time.perf_counter()
    b = len(prompts)
    assert all(len(g.token_ids) == n_new for g in gens)
    first, last = marks[b - 1], marks[-1]  # the batch's first tokens come from the prefill
    return Timing(first - t0, last - first, ids.numel(), b * (n_new - 1), t_end - t0)


class _Marks:
    """A transformers streamer that only notes when each `put` happens (the prompt, then every
    new token)."""

    def __init__(self) -> None:
        self.t: list[float] = []

    def put(self, value) -> None:
        self.t.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_generate(model: nn.Module, ids: torch.Tensor, n_new: int, device: torch.device) -> Timing:
    """transformers' own eager `generate` (greedy, its default cache), batch 1: what a user of the
    base model gets without loraswitch. Prefill ends when the streamer sees the first new token."""
    if ids.shape[0] != 1:
        raise ValueError("hf_generate times batch 1 (transformers' streamer takes one row)")
    ids = ids.to(device)
    marks = _Marks()
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                             do_sample=False, eos_token_id=None, pad_token_id=0, streamer=marks)
    _sync(device)
    t_end = time.perf_counter()
    assert out.shape[1] == ids.shape[1] + n_new and len(marks.t) == n_new + 1
    first, last = marks.t[1], marks.t[-1]
    return Timing(first - t0, last - first, ids.numel(), n_new - 1, t_end - t0)


def ls_compiled(engine: Engine, backend: str, *args) -> Timing:
    """`ls_generate` with the engine's compiled decode step (`Engine.compile`) switched on for
    the call; the first call compiles (the warm-up), later ones reuse the step."""
    engine.compile = True if backend == "inductor" else backend
    try:
        return ls_generate(engine, *args)
    finally:
        engine.compile = False


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



@dataclass
class Runner:
    """One configuration to time: a run, whether it gets a warm-up (X-LoRA, with no KV cache, is
    run once), and extra fields for its report row."""

    run: Callable[[], Timing]
    warmup: bool = True
    extra: dict | None = None


def summarize(runs: list[Timing], peak_bytes: int) -> dict:
    """Median tokens/s of the timed runs and their spread ((max - min) / median), so a reader sees
    how far one run can be trusted."""
    dec = [r.decode_tps for r in runs]
    pre = [r.prefill_tps for r in runs]
    med_dec, med_pre = median(dec), median(pre)
    return {"prefill_tok_s": round(med_pre, 1), "decode_tok_s": round(med_dec, 2),
            "decode_spread": round((max(dec) - min(dec)) / med_dec, 3) if med_dec else None,
            "prefill_s": round(median([r.prefill_s for r in runs]), 4),
            "decode_s": round(median([r.decode_s for r in runs]), 4), "total_s": round(median([r.total_s for r in runs]), 4),
            "peak_mem_mb": round(peak_bytes / 2**20, 1), "runs_decode_tok_s": [round(x, 2) for x in dec]}


def interleaved(runners: dict[str, Runner], repeats: int, device: torch.device,
                log: Callable[[str], None] = lambda s: None) -> dict[str, dict]:
    """Time every configuration `repeats` times round-robin (round k starts k places further on),
    after one warm-up each that also measures peak memory: a slow minute on a shared machine then
    hits every configuration alike instead of the one that happened to run then, and the ratios
    between configurations hold still. Reports medians and spread; a failing configuration gets
    an error entry and never loses the others."""
    names = list(runners)
    peaks: dict[str, int] = {}
    runs: dict[str, list[Timing]] = {n: [] for n in names}
    errors: dict[str, str] = {}

    def attempt(name: str, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"

    for name in names:
        r = runners[name]
        log(f"warm-up {name}")

        def warm(r=r, name=name):
            with PeakMemory(device) as mem:
                t = r.run()
            peaks[name] = mem.peak
            if not r.warmup:  # run once: the measured run is the only one
                runs[name].append(t)

        attempt(name, warm)
    for k in range(repeats):
        order = names[k % len(names):] + names[: k % len(names)]
        for name in order:
            if name in errors or not runners[name].warmup:
                continue
            log(f"round {k + 1}/{repeats} {name}")
            attempt(name, lambda name=name: runs[name].append(runners[name].run()))
    return {n: ({"error": errors[n]} if n in errors else {**summarize(runs[n], peaks[n]), **(runners[n].extra or {})})
            for n in names}
