"""The Ray scale-out's parts that need no Ray: metrics aggregation, --autoscale parsing, the
in-process ASGI call a replica answers through, and the CLI's refusals."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from typer.testing import CliRunner

from loraswitch.server.ray_serve.asgi import Forwarded, call
from loraswitch.server.ray_serve.cluster import Library, labelled, merge_metrics
from loraswitch.server.ray_serve.launch import Scale, parse_autoscale

A = b"""# HELP reqs_total Requests.
# TYPE reqs_total counter
reqs_total{endpoint="chat",status="200"} 3.0
# HELP depth Queue depth.
# TYPE depth gauge
depth 2.0
"""
B = b"""# HELP reqs_total Requests.
# TYPE reqs_total counter
reqs_total{endpoint="chat",status="200"} 5.0
# HELP depth Queue depth.
# TYPE depth gauge
depth 0.0
"""


def test_merged_metrics_label_each_replica_and_keep_families_contiguous():
    text = merge_metrics({"r2": B, "r1": A})
    lines = text.splitlines()
    assert lines == ["# HELP reqs_total Requests.", "# TYPE reqs_total counter",
                     'reqs_total{replica="r1",endpoint="chat",status="200"} 3.0',
                     'reqs_total{replica="r2",endpoint="chat",status="200"} 5.0',
                     "# HELP depth Queue depth.", "# TYPE depth gauge",
                     'depth{replica="r1"} 2.0', 'depth{replica="r2"} 0.0']
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert sum(s.value for s in families["reqs"].samples) == 8.0  # a valid exposition, summable across replicas
    assert labelled("x{} 1", "r") == 'x{replica="r"} 1'


def test_library_log_and_who_is_behind():
    lib = Library()
    lib.report("a", 0)
    lib.report("b", 0)
    v = lib.append({"op": "load", "body": {"path": "/x/plus"}})
    assert v == 1 and lib.since(0) == [{"op": "load", "body": {"path": "/x/plus"}}] and lib.since(1) == []
    assert lib.behind(v) == ["a", "b"]
    lib.report("a", 1)
    assert lib.behind(v) == ["b"]
    lib.reports["b"]["at"] -= 60  # a replica that stopped reporting is not waited for
    assert lib.behind(v) == [] and set(lib.live()) == {"a"}


def test_autoscale_and_scale_options():
    assert parse_autoscale("1:3") == (1, 3)
    for bad in ("3:1", "0:2", "2", "a:b", ""):
        with pytest.raises(ValueError):
            parse_autoscale(bad)
    assert Scale(replicas=2).options(16) == {"num_replicas": 2, "max_ongoing_requests": 16}
    auto = Scale(autoscale=(1, 4)).options(16)["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["initial_replicas"]) == (1, 4, 1)


def test_asgi_call_streams_the_apps_response_and_tells_it_when_the_caller_leaves():
    app = FastAPI()
    closed = asyncio.Event()

    @app.post("/echo")
    async def echo(body: dict):
        async def gen():
            try:
                for i in range(1000):
                    yield f"{body['word']}{i};"
                    await asyncio.sleep(0.01)
            finally:
                closed.set()
        return StreamingResponse(gen(), media_type="text/plain", headers={"x-kind": "echo"})

    async def main():
        req = Forwarded("POST", "/echo", headers=[(b"content-type", b"application/json")], body=b'{"word": "hi"}')
        items = call(app, req)
        head = await items.__anext__()
        assert head["status"] == 200 and (b"x-kind", b"echo") in head["headers"]
        chunks = [await items.__anext__() for _ in range(3)]
        assert chunks == [b"hi0;", b"hi1;", b"hi2;"]
        await items.aclose()  # the ingress's client went away: the app's stream must end
        await asyncio.wait_for(closed.wait(), 5)
        missing = [x async for x in call(app, Forwarded("GET", "/nowhere"))]
        assert missing[0]["status"] == 404 and b"Not Found" in b"".join(missing[1:])

    asyncio.run(main())


def test_ray_flags_need_ray():
    import typer

    from loraswitch.server.cli import serve

    app = typer.Typer()
    app.command("serve")(serve)
    app.command("noop")(lambda: None)

    def said(result) -> str:  # the error box's text, unwrapped
        return " ".join(result.output.replace("│", " ").split())

    for args in (["--replicas", "2"], ["--autoscale", "1:2"], ["--ray-address", "127.0.0.1:6379"]):
        result = CliRunner().invoke(app, ["serve", *args])
        assert result.exit_code == 2 and "only with --ray" in said(result), said(result)
    result = CliRunner().invoke(app, ["serve", "--ray", "--replicas", "2", "--autoscale", "1:2"])
    assert result.exit_code == 2 and "not both" in said(result)
    result = CliRunner().invoke(app, ["serve", "--ray", "--autoscale", "2:1"])
    assert result.exit_code == 2 and "MIN:MAX" in said(result)


def test_a_replica_waiting_to_apply_a_change_keeps_reporting_and_is_waited_for(monkeypatch):
    """A change is applied between batches, so a replica may wait out a long batch before it has
    it; its heartbeat goes on meanwhile, so the ingress sees it live and behind (and waits for it)
    instead of taking it for dead and answering the change before it applied it."""
    pytest.importorskip("ray.serve")
    from types import SimpleNamespace

    from loraswitch.server.ray_serve import replica as rp

    class Remote:
        def __init__(self, fn):
            self.fn = fn

        async def remote(self, *args):
            return self.fn(*args)

    lib = Library()
    lib.append({"op": "remove", "name": "x"})
    r = rp.Replica.__new__(rp.Replica)
    r.library = SimpleNamespace(since=Remote(lib.since), report=Remote(lib.report))
    r.id, r.version = "r1", 0
    r.app = SimpleNamespace(state=SimpleNamespace(metrics=SimpleNamespace(render=lambda: b"")))
    r.health = lambda: {"alive": True}
    batch_over = asyncio.Event()

    async def apply_after_the_batch(op):
        await batch_over.wait()

    r._apply = apply_after_the_batch
    monkeypatch.setattr(rp, "POLL_S", 0.01)

    async def scenario():
        tasks = [asyncio.create_task(r._every_poll(r.sync, "sync")), asyncio.create_task(r._every_poll(r.report, "report"))]
        await asyncio.sleep(0.1)
        seen = lib.reports["r1"]["at"]
        await asyncio.sleep(0.1)
        beating = lib.reports["r1"]["at"] > seen
        behind = lib.behind(1)
        batch_over.set()
        await asyncio.sleep(0.1)
        for t in tasks:
            t.cancel()
        return beating, behind, lib.behind(1)

    beating, behind, after = asyncio.run(scenario())
    assert beating and behind == ["r1"]  # live while it waits, and known to be behind
    assert after == [] and r.version == 1


def test_a_stream_is_held_until_it_carries_text_so_a_replica_lost_before_is_retried():
    """The ingress holds a stream's role-only opening chunk until text (or an end or error)
    follows: a replica that dies in between raises where the request can still go elsewhere."""
    pytest.importorskip("ray.serve")
    from loraswitch.server.ray_serve.ingress import opening, says_something

    role = b'data: {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}\n\n'
    text = b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n\n'
    assert not says_something(role) and says_something(text) and says_something(b"data: [DONE]\n\n")
    assert says_something(b'data: {"error": {"message": "x"}}\n\n')
    assert says_something(b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}\n\n')

    async def replica(chunks, dies=False):
        for c in chunks:
            yield c
        if dies:
            raise RuntimeError("replica died")

    assert asyncio.run(opening(replica([role, text, text]))) == role + text
    with pytest.raises(RuntimeError, match="died"):  # before any text: the relay retries elsewhere
        asyncio.run(opening(replica([role], dies=True)))
