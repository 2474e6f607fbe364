"""The library's front door: one object that holds the engine and its routers and answers
requests with `model="auto"` (route), `"base"`, or an adapter name.

There is one answering path: `Switch.run` takes requests (`switch.request.Request`, each behind a
`Handle` that receives its events) and decodes them in as few batched forwards as possible
(`switch.run`). `Switch.stream` iterates over the events of a list of requests, `Switch.chat`
collects their answers, and the server's worker calls `run` with whatever requests are waiting,
so the CLI, the evaluation harness and the server route, split and generate identically.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from loraswitch.base import Base, load_base
from loraswitch.constants import DEMO_ADAPTER_DIR
from loraswitch.engine import Engine
from loraswitch.generate import Generation, Policy, SamplingParams, explicit
from loraswitch.library import AdapterError
from loraswitch.routing import ROUTER_NAMES, Router, load_router
from loraswitch.switch.escalate import Escalator
from loraswitch.switch.mixture import MixtureError, MixturePolicy, allowed_set, check_names, mixture_of, parse_model
from loraswitch.switch.request import PENALTIES, Done, Event, Failed, Handle, Request, listed
from loraswitch.switch.run import run

if TYPE_CHECKING:
    import torch

MAX_BATCH = 32


class Switch:
    """A base model, its adapter library and its routers."""

    def __init__(
        self,
        base: Base | str | None = None,
        adapter_dirs: list[str | Path] | str | Path | None = None,
        router_dir: str | Path | None = None,
        upstream: Escalator | None = None,
    ):
        if not isinstance(base, Base):
            base = load_base(base)
        self.base = base
        dirs = [DEMO_ADAPTER_DIR] if adapter_dirs is None else listed(adapter_dirs)
        self.engine = Engine(base, dirs)
        self.router_dir = Path(router_dir) if router_dir else None
        self._routers: dict[tuple[str, int], Router] = {}
        # called with (features, prompt) for every prompt `auto` sent to no adapter (the server's
        # shift detector, `server.shifts`); None: nobody listens
        self.on_unrouted: Callable[[torch.Tensor, str], None] | None = None
        self.upstream = upstream  # where routed requests the local model would answer poorly go (`switch.escalate`)

    def router(self, name: str = "auto") -> Router:
        """A router by name ("auto", "seq", "arrow", "gate"), loaded once per library version."""
        version = self.engine.version
        key = (name, version)
        router = self._routers.get(key)
        if router is None:
            router = load_router(self.engine, name, self.router_dir)
            # routers of earlier library versions are never asked for again: keeping them grew
            # memory with every adapter load / unload
            for old in [k for k in list(self._routers) if k[1] != version]:
                self._routers.pop(old, None)
            self._routers[key] = router
        return router

    def resolve(self, model: str, route: str | None = None, allow=None, deny=()) -> tuple[str, str | None]:
        """(model, route) as a request means them: "auto:arrow" is model "auto" with router
        "arrow"; a router only applies to "auto"; a mixture ("a:0.7+b:0.3") comes back in its
        canonical spelling (`switch.mixture`), and `allow` / `deny` only apply to "auto". Raises
        ValueError (MixtureError) for a bad combination and AdapterError for an unknown name."""
        if allow is not None or deny:
            if model.split(":", 1)[0] != "auto":
                raise MixtureError(f"allow / deny only apply to model 'auto' ({model!r} is explicit)", "invalid_allow")
            check_names([*(allow or ()), *deny], self.engine.names, "allow / deny")
        mix = parse_model(model)
        if mix is not None:
            if route not in (None, "none"):
                raise ValueError(f"route={route!r} only applies to model 'auto' ({model!r} is a mixture)")
            check_names(mix.names, self.engine.names, "the mixture")
            return mix.spec, None
        if model.startswith("auto:"):
            model, route = "auto", route or model.split(":", 1)[1]
        if model == "auto":
            if route is not None and route not in ROUTER_NAMES:
                raise ValueError(f"unknown router {route!r}; choose one of {', '.join(ROUTER_NAMES)}")
            return model, route
        if route not in (None, "none"):
            raise ValueError(f"route={route!r} only applies to model 'auto' ({model!r} is explicit)")
        if model != "base" and model not in self.engine.names:
            refused = self.engine.errors.get(model)
            raise AdapterError(model, f"was refused when the library loaded: {refused.reason}" if refused
                               else f"unknown adapter {model!r}")
        return model, None

    def policy(self, prompts: list[str], model: str = "auto", route: str | None = None, allow=None,
               deny=()) -> Policy:
        """`model`: "auto" routes (with router `route`, default "auto", choosing only among
        `allow` minus `deny`), "base", an adapter name or a mixture."""
        if model == "auto":
            allowed = allowed_set(self.engine.names, allow, deny)
            return self.router(route or "auto").policy(self.engine, prompts, allowed)
        if route not in (None, "none"):
            raise ValueError(f"route={route!r} only applies to model='auto' (model={model!r} is explicit)")
        mix = parse_model(model)
        if mix is not None:
            return MixturePolicy(self.engine, mix, len(prompts))
        return explicit(self.engine, [model] * len(prompts))

    def route(self, prompt: str, router: str = "auto") -> dict:
        """Which adapter would answer `prompt` (the decision's dict: adapter, confidence, scores);
        with a router that fans out, and a prompt it would answer part by part, what the answer's
        routing would say: `adapter` the list of the parts' adapters, `confidence` the lowest, and
        `parts` (each part's text, its span in the prompt, its adapter and confidence); the
        whole prompt's own decision is kept under `whole`."""
        from loraswitch.switch.segment import segment

        chosen = self.router(router)
        inner = getattr(chosen, "inner", None)  # `auto` names the router it runs, as answers do
        out = {"router": f"{chosen.name} ({inner.name})" if inner is not None else chosen.name,
               **chosen.route(self.engine, [prompt])[0].to_dict()}
        if getattr(chosen, "fans_out", False):
            found = segment(chosen, self.engine, [prompt])[0]
            if len(found.parts) >= 2:
                decisions = chosen.route(self.engine, found.texts)
                # a part cut because no adapter fits it is answered by the base model (`parts.fan_out`)
                parts = [{"text": p.text, "span": [p.start, p.end],
                          **({"chained_from": p.after + 1} if p.chained else {}),
                          **({"adapter": None, "confidence": 1.0} if p.for_base else
                             {k: v for k, v in d.to_dict().items() if k in ("adapter", "confidence", "none_probability")})}
                         for p, d in zip(found.parts, decisions)]
                out = {"router": out["router"], "adapter": [p["adapter"] for p in parts],
                       "confidence": min(p["confidence"] for p in parts), "parts": parts, "whole": out}
        return out

    def run(self, handles: list[Handle], max_rows: int | None = MAX_BATCH, max_parts: int | None = None,
            requeue=None, arrivals=None) -> list[dict]:
        """Answer every handle's request; each gets its events (started, token, switched, then
        done or failed) through `handle.emit` as they happen. At most `max_rows` rows per batched
        forward; a request of more than `max_parts` numbered parts is answered whole (`routing.not_split`).
        With an upstream, `requeue(handle)` (a server's queue) takes the requests the upstream
        failed, so this returns without waiting for the upstream. `arrivals` (`run.Arrivals`, a
        server's queue) hands in requests that arrive meanwhile, to join the running batch
        (continuous batching). Returns the batches formed."""
        return run(self, handles, max_rows, max_parts, requeue, arrivals)

    def stream(self, requests: list[Request]) -> Iterator[tuple[int, Event]]:
        """(request index, event) as the answers are written; the generation runs in a thread and
        stops early (its rows leave the batch) when the iterator is closed."""
        events: queue.Queue = queue.Queue()
        handles = [Handle(r, emit=lambda e, i=i: events.put((i, e))) for i, r in enumerate(requests)]
        finished = object()

        def work() -> None:
            try:
                self.run(handles)
            finally:
                events.put(finished)

        thread = threading.Thread(target=work, name="loraswitch-stream", daemon=True)
        thread.start()
        try:
            while (item := events.get()) is not finished:
                yield item
        finally:
            for h in handles:
                h.cancel()
            thread.join()

    def chat(
        self,
        prompts: list[str] | str,
        model: str | dict[str, float] = "auto",
        route: str | None = None,
        params: SamplingParams | None = None,
        system: str | None = None,
        allow: list[str] | str | None = None,
        deny: list[str] | str = (),
    ) -> list[Generation]:
        """Answer each prompt as one chat turn, in batches of up to MAX_BATCH rows. With a router
        that fans out (`auto`), a prompt of numbered parts becomes one row per part and its answer
        is assembled from theirs (`switch.parts`). `model` may be a mixture, as a string
        ("a:0.7+b:0.3") or {name: weight}; `allow` / `deny` restrict what `auto` chooses."""
        prompts, allow, deny = listed(prompts), listed(allow), listed(deny)  # one name: not its letters
        if any(not isinstance(p, str) for p in prompts):
            raise TypeError("Switch.chat takes prompt strings; give Request objects to Switch.stream or Switch.run")
        params = params or SamplingParams()
        model = mixture_of(model).spec if isinstance(model, dict) else model
        model, route = self.resolve(model, route, allow, deny)
        allow = tuple(allow) if allow is not None else None
        requests = [Request.chat(p, system=system, model=model, route=route, allow=allow, deny=tuple(deny),
                                 max_tokens=params.max_new_tokens,
                                 temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                 min_p=params.min_p, seed=params.seed, logprobs=params.logprobs,
                                 **{name: getattr(params, name) for name in PENALTIES}) for p in prompts]
        answers: list[Generation | None] = [None] * len(requests)
        errors: list[Exception] = []

        def collect(i: int, event: Event) -> None:
            if isinstance(event, Failed):
                errors.append(event.error)
            elif isinstance(event, Done):
                answers[i] = event.answer

        self.run([Handle(r, emit=lambda e, i=i: collect(i, e)) for i, r in enumerate(requests)])
        if errors:
            raise errors[0]
        return answers  # type: ignore[return-value]


__all__ = ["Switch", "Request", "Handle", "ROUTER_NAMES"]
