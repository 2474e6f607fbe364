"""The engine: a base model whose targeted linears are multi-LoRA layers, plus the adapters
loaded into them by name, and one forward pass that takes per-token routing.

Adapters get stable integer slots. Loading wraps any newly targeted linear and writes the
factors into that slot of each layer; removing frees the slot, but only once no in-flight
generation still holds it (`pin`), so a request never sees its adapter vanish mid-answer.

A library larger than the layers should hold (`max_resident`, vLLM's `max_loras` next to its
CPU LoRA cache) keeps every adapter known, validated and in host memory, and only the most
recently used ones in the layers' stacks: `slot_of` pages an adapter in on first use, and when
the last generation in flight ends the least recently used ones are paged out down to the
limit. A batch that needs more adapters than the limit gets them all for its duration (the
limit is enforced between generations, never by failing a request).
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from loraswitch.base import Base, use_packed_attention
from loraswitch.kernels import Routing
from loraswitch.layers import DynamicRouter, MultiLoRALinear, RoutingContext, wrap_linear
from loraswitch.library import Adapter, AdapterError, read_adapter, scan, validate_name
from loraswitch.padding import positions_of


class Engine:
    """Base model + adapter slots + the shared routing context the layers read."""

    def __init__(self, base: Base, adapter_dirs: list[str | Path] | None = None, compile: bool | str = False,
                 max_resident: int | None = None):
        self.base = base
        # decode on a static cache with a compiled step (loraswitch.decode): True = torch.compile's
        # inductor, a string = another torch.compile backend, "none" = the static path uncompiled
        self.compile = compile
        self.decoder = None  # that step and its caches (decode.Decoder), made on first use
        # the generation prefill reuses the keys and values of openings earlier prompts shared
        # (decode.PrefixCache): at most this many cached positions (~46 KB each for SmolLM2); 0: off
        self.prefix_tokens = 2048
        self.prefixes = None  # that cache, made on first use
        self.model = base.model
        use_packed_attention(self.model)  # the compiled step's decode attention (base._packed_sdpa)
        self.ctx = RoutingContext()
        self.layers: dict[str, MultiLoRALinear] = {}
        self.adapters: dict[str, Adapter] = {}  # every adapter of the library, resident or not
        self.slots: dict[str, int] = {}  # the resident ones: their slot in the layers' stacks
        self.max_resident = max_resident  # adapters kept in the stacks between generations (None: all)
        self._recent: OrderedDict[str, None] = OrderedDict()  # resident adapters, least recently used first
        self.residency = 0  # bumped whenever an adapter is paged in or out (slot ids change)
        self.page_ins = 0  # adapters written into the layers since start (load or first use)
        self.errors: dict[str, AdapterError] = {}
        # example prompts given with an adapter at load time (routers learn the new adapter from
        # them; an adapter folder's own examples.jsonl / .txt is read by the router itself)
        self.examples: dict[str, list[str]] = {}
        self.lock = threading.RLock()  # one forward / one library change at a time
        self._pins: Counter[int] = Counter()
        self._retired: dict[int, Adapter] = {}  # removed but still pinned by in-flight work
        self._free: list[int] = []
        self._next_slot = 0
        self.version = 0  # bumped on every library change (not on paging); routers key caches on it
        if adapter_dirs:
            self.load_dirs(adapter_dirs)

    # ------------------------------------------------------------------ the library
    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    @property
    def device(self) -> torch.device:
        """Where the model's weights live: inputs and routing built on the CPU are moved here."""
        return next(self.base.model.parameters()).device

    def load_dirs(self, dirs: list[str | Path]) -> dict[str, AdapterError]:
        """Load every adapter under `dirs`; returns (and remembers) the refusals."""
        result = scan(dirs, self.model, self.base.name, taken=set(self.adapters))
        for adapter in result.adapters:
            self.add_adapter(adapter)
        self.errors.update(result.errors)
        return result.errors

    def load_adapter(self, path: str | Path, name: str | None = None, examples: list[str] | None = None) -> Adapter:
        """Read, validate and install one adapter folder (raises AdapterError). `examples`:
        prompts it is for, which routing learns it from (else its folder's examples file, else
        its weights alone)."""
        adapter = read_adapter(path, self.model, name=name, base_name=self.base.name)
        self.add_adapter(adapter, examples)
        return adapter

    def add_adapter(self, adapter: Adapter, examples: list[str] | None = None) -> int | None:
        """Add `adapter` to the library; its slot, or None when the resident limit keeps it
        paged out until first use."""
        validate_name(adapter.name)
        with self.lock:
            if adapter.name in self.adapters:
                raise AdapterError(adapter.name, "duplicate name: an adapter of that name is already loaded")
            self.adapters[adapter.name] = adapter
            self.errors.pop(adapter.name, None)
            if examples:
                self.examples[adapter.name] = list(examples)
            self.version += 1
            if self.max_resident is not None and len(self.slots) >= self.max_resident:
                return None
            return self._page_in(adapter)

    def remove_adapter(self, name: str) -> None:
        """Stop routing to `name` now; its slot is freed once no in-flight work pins it."""
        with self.lock:
            adapter = self.adapters.pop(self._known(name))
            self.examples.pop(name, None)
            self.version += 1
            if name in self.slots:
                self._page_out(adapter)

    def _page_in(self, adapter: Adapter) -> int:
        """Write `adapter`'s factors into a free slot of every layer it targets."""
        slot = self._free.pop(0) if self._free else self._next_slot
        self._next_slot = max(self._next_slot, slot + 1)
        for key, module in adapter.modules.items():
            if key not in self.layers:
                self.layers[key] = wrap_linear(self.model, key, self.ctx)
            self.layers[key].set_slot(slot, module)
        for layer in self.layers.values():  # every stack indexes every slot id
            layer.reserve(self._next_slot)
        self.slots[adapter.name] = slot
        self._recent[adapter.name] = None
        self.residency += 1
        self.page_ins += 1
        return slot

    def _page_out(self, adapter: Adapter) -> None:
        """Take `adapter` out of the stacks (it stays in the library unless it was removed); a
        slot that in-flight work pins is freed when that work ends."""
        slot = self.slots.pop(adapter.name)
        self._recent.pop(adapter.name, None)
        self.residency += 1
        if self._pins[slot]:
            self._retired[slot] = adapter
        else:
            self._free_slot(slot, adapter)

    def limit_resident(self, k: int | None) -> None:
        """Keep at most `k` adapters in the layers from now on (None: all of them)."""
        self.max_resident = k
        self.trim()

    def trim(self) -> None:
        """Page out least recently used, unpinned adapters down to `max_resident`."""
        with self.lock:
            if self.max_resident is None:
                return
            for name in list(self._recent):
                if len(self.slots) <= self.max_resident:
                    break
                if not self._pins[self.slots[name]]:
                    self._page_out(self.adapters[name])

    @property
    def layout(self) -> tuple[int, int]:
        """Changes whenever a slot id may have changed (a library change or paging): what caches
        keyed on slot ids (token routers' columns) are keyed on."""
        return self.version, self.residency

    @property
    def resident(self) -> list[str]:
        """The adapters in the layers' stacks now, least recently used first (read without the
        lock, which a forward holds for its whole length: a change mid-copy is read again)."""
        for _ in range(8):
            try:
                return list(self._recent)
            except RuntimeError:  # changed during iteration by the worker thread
                continue
        with self.lock:
            return list(self._recent)

    def _free_slot(self, slot: int, adapter: Adapter) -> None:
        for key in adapter.modules:
            self.layers[key].set_slot(slot, None)
        self._free.append(slot)
        self._free.sort()

    def slot_of(self, name: str) -> int:
        """`name`'s slot, paging it in when the resident limit had left it out; marks it used."""
        with self.lock:
            if name not in self.slots:
                return self._page_in(self.adapters[self._known(name)])
            self._recent.move_to_end(name)
            return self.slots[name]

    def _known(self, name: str) -> str:
        """`name`, or the unknown-adapter error naming what is loaded."""
        if name not in self.adapters:
            known = ", ".join(self.adapters) or "none loaded"
            raise AdapterError(name, f"unknown adapter (loaded: {known})")
        return name

    def name_of(self, slot: int) -> str | None:
        for name, s in self.slots.items():
            if s == slot:
                return name
        retired = self._retired.get(slot)
        return retired.name if retired else None

    @contextmanager
    def pin(self, slots: list[int] | None = None) -> Iterator[None]:
        """Keep `slots` (default: all current) alive while a generation runs."""
        with self.lock:
            held = list(self.slots.values()) if slots is None else [s for s in slots if s >= 0]
            self._pins.update(held)
        try:
            yield
        finally:
            with self.lock:
                self._pins.subtract(held)
                for slot in held:
                    if self._pins[slot] <= 0 and slot in self._retired:
                        self._free_slot(slot, self._retired.pop(slot))
                if not +self._pins:  # the last work in flight ended: page out down to the limit. Not
                    self.trim()  # earlier: an outer pin (a server round) would keep the LRU adapter
                    # in and let the one just used go

    # ------------------------------------------------------------------ the forward pass
    @contextmanager
    def routed(self, routing: Routing | None = None, dynamic: DynamicRouter | None = None) -> Iterator[None]:
        """Run forwards inside this block with `routing` (static) or `dynamic` (per layer)."""
        if isinstance(routing, Routing):  # SlotRouting buffers are made on the device already
            routing = routing.to(self.device)
        with self.lock:
            saved = (self.ctx.static, self.ctx.dynamic)
            self.ctx.static, self.ctx.dynamic = routing, dynamic
            try:
                yield
            finally:
                self.ctx.static, self.ctx.dynamic = saved

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, routing: Routing | None = None) -> torch.Tensor:
        """Full-sequence logits [B, S, V] for a (left-padded) batch under `routing`."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = positions_of(attention_mask)
        with self.routed(routing):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return out.logits
