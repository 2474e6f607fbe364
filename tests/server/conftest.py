"""The server end to end: the real `openai` client against uvicorn on 127.0.0.1 (random free
port) serving a tiny random Llama with three random adapters. One server for the package."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from loraswitch.base import Base
from loraswitch.server import ServerSettings, create_app
from loraswitch.server.scheduler import Scheduler
from loraswitch.switch import Switch
from tests.conftest import tiny_model, write_adapter

KEY = "sk-test-key"
PROMPT = "Tell me something about rivers."
COMPOSITE = "Answer each part on its own line.\n1. Tell me about rivers.\n2. Name a colour.\n3. Count to three."


class LiveServer:
    """uvicorn in a thread on a socket we bound ourselves (no port race)."""

    def __init__(self, app):
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    @property
    def scheduler(self) -> Scheduler:
        return self.app.state.scheduler

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="package")
def lib(tmp_path_factory, tokenizer):
    base = Base(model=tiny_model(), tokenizer=tokenizer, name="tiny-llama", source="random")
    root = tmp_path_factory.mktemp("server_adapters")
    write_adapter(base.model, root / "alpha", r=4, targets=("q_proj", "v_proj"), seed=1)
    write_adapter(base.model, root / "beta", r=8, alpha=4, targets=("q_proj", "k_proj", "o_proj", "down_proj"), seed=2)
    write_adapter(base.model, root / "gamma", r=2, alpha=16, rslora=True, targets=("gate_proj", "up_proj", "v_proj"), seed=3)
    spare = tmp_path_factory.mktemp("spare_adapters")
    write_adapter(base.model, spare / "delta", r=4, targets=("q_proj", "v_proj", "o_proj"), seed=4)
    (spare / "broken").mkdir()
    (spare / "broken" / "adapter_config.json").write_text("{not json")
    routers = tmp_path_factory.mktemp("no_routers")  # no trained routers: auto falls back to arrow
    switch = Switch(base, [root], router_dir=routers)
    return switch, spare


@pytest.fixture(scope="package")
def live(lib):
    switch, _ = lib
    settings = ServerSettings(max_batch=8, max_queue=6, max_prompt_tokens=120, max_new_tokens=40, default_max_tokens=12,
                              default_temperature=0.0, timeout=30.0, api_key=KEY)
    server = LiveServer(create_app(switch, settings))
    yield server
    server.stop()


@pytest.fixture(scope="package")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="package")
def http(live):
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c


def chat(client, model="alpha", prompt=PROMPT, **kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **kw)


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def library_answer(switch, request):
    """What the library itself answers for `request` (the server must say the same)."""
    from loraswitch.switch.request import Done

    return next(e for _, e in switch.stream([request]) if isinstance(e, Done)).answer
