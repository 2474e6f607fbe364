"""One replica: a whole loraswitch server (engine, bounded queue, batching worker, metrics) that
answers the requests the ingress forwards to it, in-process through its own app (`asgi.call`).

It follows the cluster's library log (`cluster.Library`): at start it replays every change made
since the cluster began (a replica Serve restarted after a crash serves the same adapters as its
peers), then polls for new ones and applies them through its own /v1/adapters endpoints, which
load and unload between batches. Serve's model multiplexing places requests that name an adapter
on the replicas holding it (`adapter`, keyed by `serve.get_multiplexed_model_id()`).

With `adapters_per_replica` K, the engine keeps at most K adapters in its layers between batches
(`Engine.max_resident`: every adapter stays validated in host memory, the least recently used
are paged out) and Serve tracks at most K per replica, so each adapter's traffic settles on the
replicas that have it in their layers. `auto` still routes on the replica over the whole library
(its router reads only the base model's hidden states) and pages the chosen adapter in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os

from ray import serve

from loraswitch.server.ray_serve.asgi import Forwarded, call

log = logging.getLogger("loraswitch.server.ray")
POLL_S = 0.25  # how often a replica looks for library changes and reports its health and metrics
MAX_MULTIPLEXED = 1024  # adapters Serve tracks per replica when each holds its whole library


class Replica:
    """A Serve deployment class (see the module doc); `config` holds `open_switch`'s arguments
    and the `ServerSettings` fields, `library` the cluster's `Library` actor handle."""

    async def __init__(self, config: dict, library):
        import torch

        from loraswitch.console import open_switch
        from loraswitch.generate import warm_up
        from loraswitch.server.app import ServerSettings, create_app

        torch.set_num_threads(int(os.environ.get("LORASWITCH_THREADS", os.cpu_count() or 1)))
        switch = await asyncio.to_thread(open_switch, config.get("base"), config.get("adapter_dirs"),
                                         config.get("router_dir"), config.get("library", "demo"))
        switch.engine.compile = bool(config.get("compile"))
        switch.engine.prefix_tokens = int(config.get("prefix_cache", switch.engine.prefix_tokens))
        per_replica = config.get("adapters_per_replica")
        switch.engine.limit_resident(per_replica)
        # with "compile": the decode step's first graphs, on the configured engine, before this
        # replica takes requests (warm_up does nothing otherwise)
        await asyncio.to_thread(warm_up, switch.engine, int(config.get("compile_context") or 0))

        async def serves(name: str) -> str:
            """Tells Serve this replica serves adapter `name`, so its later requests come here."""
            return name

        self.adapter = serve.multiplexed(max_num_models_per_replica=per_replica or MAX_MULTIPLEXED)(serves)
        self.settings = ServerSettings(**config["settings"])
        self.app = create_app(switch, self.settings)
        self.engine = switch.engine
        self.scheduler = self.app.state.scheduler
        self.scheduler.start()
        self.library = library
        self.version = 0
        self.id = serve.get_replica_context().replica_id.unique_id
        await self.sync()
        self._tasks = [asyncio.create_task(self._every_poll(self.sync, "library sync")),
                       asyncio.create_task(self._every_poll(self.report, "report"))]

    # ------------------------------------------------------------------ requests
    async def forward(self, req: Forwarded):
        """The response to `req` as the app sends it: the head, then the body chunks."""
        model = serve.get_multiplexed_model_id()
        if model in self.engine.adapters:  # an unknown name gets the app's 404, and no placement
            await self.adapter(model)
        async for item in call(self.app, req):
            yield item

    def health(self) -> dict:
        return {"alive": self.scheduler.alive, "queue_depth": self.scheduler.queue_depth,
                "running": self.scheduler.answering, "adapters": list(self.engine.names), "resident": self.engine.resident, "page_ins": self.engine.page_ins, "version": self.version}

    # ------------------------------------------------------------------ the cluster's library
    async def sync(self) -> None:
        """Apply the library changes this replica has not seen, in order, then acknowledge."""
        ops = await self.library.since.remote(self.version)
        for op in ops:
            with contextlib.suppress(Exception):  # one bad change must not stop the others
                await self._apply(op)
            self.version += 1
        await self.report()

    async def report(self) -> None:
        """The heartbeat: the version applied so far, metrics and health."""
        await self.library.report.remote(self.id, self.version, self.app.state.metrics.render(), self.health())

    async def _apply(self, op: dict) -> None:
        names = self.engine.adapters
        if op["op"] == "load":
            body = op["body"]
            name = body.get("name") or os.path.basename(str(body["path"]).rstrip("/"))
            if name not in names:  # the replica that answered the POST has it already
                await self._call("POST", "/v1/adapters", json.dumps(body).encode())
        elif op["op"] == "remove" and op["name"] in names:
            await self._call("DELETE", f"/v1/adapters/{op['name']}")

    async def _call(self, method: str, path: str, body: bytes = b"") -> None:
        headers = [(b"content-type", b"application/json"), (b"host", b"127.0.0.1")]
        if self.settings.api_key:
            headers.append((b"authorization", f"Bearer {self.settings.api_key}".encode()))
        async for item in call(self.app, Forwarded(method, path, headers=headers, body=body)):
            if isinstance(item, dict) and item["status"] >= 300 and item["status"] != 409:
                log.warning("replica %s: %s %s answered %s", self.id, method, path, item["status"])

    async def _every_poll(self, step, what: str) -> None:
        """`step` every POLL_S, on its own task: the heartbeat (`report`) is not sent after `sync`,
        since a change is applied between batches, so `sync` can wait out a batch longer than
        `cluster.LIVE_S`, and a replica silent that long was taken for dead and not waited for (the
        ingress answered an add before it had it). A failure (the library actor briefly away) is
        logged and the next poll tries again."""
        while True:
            await asyncio.sleep(POLL_S)
            try:
                await step()
            except Exception:
                log.exception("replica %s: %s failed", self.id, what)

    def __del__(self):
        with contextlib.suppress(Exception):
            for task in self._tasks:
                task.cancel()
            self.scheduler.stop(timeout=2)
