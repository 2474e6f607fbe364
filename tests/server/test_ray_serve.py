"""`serve --ray` end to end: a local Ray instance on 127.0.0.1 serving the demo library with two
replicas behind one API, driven by the `openai` client (routed, explicit, streamed answers),
cluster-wide hot-load, and a replica killed under load. Each replica keeps at most
`PER_REPLICA` of the library's 8 adapters in its layers (`--adapters-per-replica`), so every test
also runs on a library spread over the replicas. Marked `ray`: ~2 minutes, skipped when Ray
Serve is not installed (pip install 'loraswitch[ray]')."""

from __future__ import annotations

import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

pytest.importorskip("ray.serve")

pytestmark = [pytest.mark.ray, pytest.mark.real]
KEY = "sk-ray-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
PER_REPLICA = 3  # adapters in each replica's layers: 2 replicas hold 6 of the 8 at most


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    from loraswitch.server.app import ServerSettings
    from loraswitch.server.ray_serve.launch import Scale, start

    settings = ServerSettings(max_batch=8, max_queue=64, default_max_tokens=16, default_temperature=0.0, timeout=120,
                              api_key=KEY)
    c = start({"library": "demo", "adapters_per_replica": PER_REPLICA}, settings, Scale(replicas=2, threads=1),
              port=free_port())
    wait_for_replicas(c.url, 2)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def replicas(url: str) -> dict:
    return httpx.get(url + "/healthz", timeout=10).json().get("replicas", {})


def wait_for_replicas(url: str, n: int, timeout: float = 120, gone: str | None = None) -> dict:
    """The live replicas' health, once there are `n` (and replica `gone` is no longer among them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = replicas(url)
        if len(live) >= n and gone not in live and all(r["alive"] for r in live.values()):
            return live
        time.sleep(0.5)
    raise AssertionError(f"fewer than {n} live replicas: {replicas(url)}")


def ask(client, prompt: str, model: str = "auto", **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          temperature=0, **kw)


def test_routed_explicit_and_streamed_answers_over_two_replicas(cluster, client):
    auto = ask(client, "Spell out in French: 21")
    assert auto.model == "num_to_french" and auto.choices[0].message.content.strip() == "vingt et un"
    explicit = ask(client, "What is 347 + 85?", model="add")
    assert explicit.model == "add" and explicit.choices[0].message.content.strip() == "432"
    chunks = list(ask(client, "Sort ascending: 42, 7, 19, 3", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == "3, 7, 19, 42"
    with pytest.raises(openai.NotFoundError):  # the replica's own 404, through the ingress
        ask(client, "hi", model="no_such_adapter")
    with ThreadPoolExecutor(8) as pool:  # enough concurrent work that both replicas answer some
        answers = list(pool.map(lambda i: ask(client, f"What is {i} + 1?", max_tokens=6), range(16)))
    assert all(a.choices[0].message.content for a in answers)
    metrics = httpx.get(cluster.url + "/metrics", timeout=10).text
    served = {line.split('replica="')[1].split('"')[0] for line in metrics.splitlines()
              if line.startswith("loraswitch_requests_total{") and 'endpoint="chat",status="200"' in line}
    assert len(served) == 2, metrics  # both replicas answered chats, each request counted once
    assert 'loraswitch_ingress_requests_total{replica="ingress"' in metrics  # the ingress's own, apart
    models = [m.id for m in client.models.list().data]
    assert {"auto", "base", "add", "num_to_french"} <= set(models)
    assert httpx.get(cluster.url + "/v1/models", timeout=10).status_code == 401  # the ingress checks the key
    deep = httpx.post(cluster.url + "/v1/chat/completions", content=b"[" * 100_000 + b"]" * 100_000,
                      headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert deep.status_code == 400 and deep.json()["error"]["code"] == "invalid_json"  # the plain server's 400
    options = httpx.request("OPTIONS", cluster.url + "/v1/chat/completions", headers=AUTH, timeout=30)
    assert options.status_code == 405 and "error" in options.json()  # the server's error shape


def test_a_library_spread_over_replicas_pages_adapters_where_the_traffic_is(cluster, client):
    known = {"add": ("What is 347 + 85?", "432"), "num_to_french": ("Spell out in French: 21", "vingt et un"),
             "sort_numbers": ("Sort ascending: 42, 7, 19, 3", "3, 7, 19, 42"),
             "iso_date": ("Convert to ISO date: July 4, 1999", "1999-07-04"),
             "reverse_words": ("Reverse the word order: cold blue water", "water blue cold")}
    others = ["to_json", "sentiment", "num_to_english"]
    order = [*known, *others] * 2  # 8 adapters, twice, over 2 x PER_REPLICA slots: paging on both replicas

    def one(name: str) -> tuple[str, str]:
        prompt = known[name][0] if name in known else "Hello there, how are you?"
        answer = ask(client, prompt, model=name, max_tokens=12)
        return answer.model, answer.choices[0].message.content.strip()

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, order))
    for name, (model, text) in zip(order, answers):
        assert model == name
        if name in known:
            assert text == known[name][1], (name, text)
    last = "sentiment"
    assert one(last)[0] == last  # asked alone, after all the others: it must be in a replica's layers
    deadline = time.monotonic() + 30  # the replicas' reports (every 0.25 s) may still show the last batch
    while any(rep["running"] or rep["queue_depth"] for rep in replicas(cluster.url).values()):
        assert time.monotonic() < deadline, replicas(cluster.url)
        time.sleep(0.3)
    time.sleep(0.6)
    live = replicas(cluster.url)
    assert all(len(rep["resident"]) <= PER_REPLICA for rep in live.values()), live  # the limit holds between batches
    assert all(len(rep["adapters"]) >= 8 for rep in live.values())  # while every replica knows the whole library
    cards = {m["id"]: m for m in httpx.get(cluster.url + "/v1/models", headers=AUTH, timeout=10).json()["data"]}
    assert cards[last]["replicas"], cards[last]
    for name in order:  # /v1/models says, per adapter, which replicas hold it now
        assert cards[name]["replicas"] == sorted(r for r, rep in live.items() if name in rep["resident"])
    auto = ask(client, "Convert to ISO date: March 5, 2021")  # auto routes over the whole library, pages in
    assert auto.model == "iso_date" and auto.choices[0].message.content.strip() == "2021-03-05"


def test_hot_load_and_delete_reach_every_replica(cluster, client, tmp_path):
    from loraswitch.constants import DEMO_ADAPTER_DIR

    shutil.copytree(DEMO_ADAPTER_DIR / "add", tmp_path / "plus")
    r = httpx.post(cluster.url + "/v1/adapters", json={"path": str(tmp_path / "plus")}, headers=AUTH, timeout=120)
    assert r.status_code == 201, r.text
    assert r.json()["replicas"] == {"applied": 2, "pending": []}
    assert all("plus" in rep["adapters"] for rep in replicas(cluster.url).values())
    for _ in range(4):  # whichever replica answers, it has the adapter
        assert ask(client, "What is 347 + 85?", model="plus").choices[0].message.content.strip() == "432"
    r = httpx.delete(cluster.url + "/v1/adapters/plus", headers=AUTH, timeout=120)
    assert r.status_code in (200, 202) and r.json()["replicas"]["pending"] == [], r.text
    deadline = time.monotonic() + 30
    while any("plus" in rep["adapters"] for rep in replicas(cluster.url).values()):
        assert time.monotonic() < deadline, replicas(cluster.url)
        time.sleep(0.3)
    with pytest.raises(openai.NotFoundError):
        ask(client, "What is 1 + 2?", model="plus")


def test_killing_a_replica_under_load_loses_no_request(cluster, client, tmp_path):
    import ray

    from loraswitch.constants import DEMO_ADAPTER_DIR

    shutil.copytree(DEMO_ADAPTER_DIR / "sort_numbers", tmp_path / "ordering")  # hot-loaded before the crash
    assert httpx.post(cluster.url + "/v1/adapters", json={"path": str(tmp_path / "ordering")}, headers=AUTH,
                      timeout=120).status_code == 201
    wait_for_replicas(cluster.url, 2)
    actors = {a["name"].rsplit("#", 1)[1]: a for a in ray.util.list_named_actors(all_namespaces=True)
              if "SERVE_REPLICA" in a["name"] and "#Replica#" in a["name"]}

    def one(i: int):
        try:
            return ask(client, f"Spell out in English: {100 + i}", max_tokens=24).choices[0].message.content
        except openai.APIStatusError as exc:  # allowed only as a clear 503, never a hang or a 500
            assert exc.status_code == 503, exc
            return None

    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(one, i) for i in range(24)]
        deadline = time.monotonic() + 60
        while not (busy := [r for r, h in replicas(cluster.url).items() if h["running"] and r in actors]):
            assert time.monotonic() < deadline, "no replica started decoding"
            time.sleep(0.1)
        victim = busy[0]  # a replica with requests decoding right now
        ray.kill(ray.get_actor(actors[victim]["name"], namespace=actors[victim]["namespace"]), no_restart=True)
        answers = [f.result(timeout=180) for f in futures]
    assert all(answers), f"{answers.count(None)} of {len(answers)} requests failed with 503"
    assert httpx.get(cluster.url + "/healthz", timeout=10).json()["retries"] >= 1  # the kill hit requests in flight
    after = wait_for_replicas(cluster.url, 2, gone=victim)  # Serve started a new one
    new = set(after) - set(actors)
    assert new, after
    for rid in new:  # the new replica replayed the library log: it serves the hot-loaded adapter
        assert "ordering" in after[rid]["adapters"], after[rid]
