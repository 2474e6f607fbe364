"""The upstream client (`switch.upstream`) against a misbehaving OpenAI-compatible server on
loopback: whatever goes wrong after text was passed on, the answer ends with that text and
finish_reason "error" (a local answer was appended to it); anything not shaped like an OpenAI
stream before that is an `UpstreamError` (answered locally), and no secret is repeated."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loraswitch.switch.request import Request, Token
from loraswitch.switch.upstream import Upstream, UpstreamError

KEY = "sk-SECRET-abc123"


def _chunk(content) -> bytes:
    return f"data: {json.dumps({'model': 'm', 'choices': [{'index': 0, 'delta': {'content': content}}]})}\n\n".encode()


BODIES = {
    "ok": _chunk("Fake") + _chunk(" answer") + b"data: [DONE]\n\n",
    "list_after_text": _chunk("Fake") + _chunk(" up") + b"data: [1, 2, 3]\n\n",
    "int_after_text": _chunk("Fake") + _chunk(123) + _chunk(" more"),
    "int_first": _chunk(123),
    "not_object_first": b"data: \"hello\"\n\n",
    "endless": b"".join(_chunk("word " * 50) for _ in range(40)) + b"data: [DONE]\n\n",
    "odd_fields": _chunk("Fake") + b'data: {"model": 7, "usage": 5, "choices": []}\n\n' + b"data: [DONE]\n\n",
}


class _Fake(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        mode = self.path.split("/")[1]
        if mode == "unauthorized":  # an upstream that echoes the Authorization header
            body = f"bad key {self.headers.get('Authorization')}".encode()
            self.send_response(401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        body = BODIES[mode]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def fake():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _ask(fake: str, mode: str):
    tokens = []
    up = Upstream(f"{fake}/{mode}", "m", api_key=KEY, timeout=5)
    answer = up.answer(Request.chat("hi", max_tokens=8),
                       lambda e: tokens.append(e.text) if isinstance(e, Token) else None, lambda: False)
    return answer, tokens


def test_a_good_stream_is_passed_on(fake):
    answer, tokens = _ask(fake, "ok")
    assert answer.text == "Fake answer" == "".join(tokens) and answer.finish_reason == "stop"


@pytest.mark.parametrize("mode", ["list_after_text", "int_after_text"])
def test_a_bad_chunk_after_text_ends_the_answer_with_what_arrived(fake, mode):
    answer, tokens = _ask(fake, mode)
    assert answer.text == "".join(tokens) == ("Fake up" if mode == "list_after_text" else "Fake")
    assert answer.finish_reason == "error" and "broke after" in answer.routing["upstream"]["error"]
    assert all(isinstance(t, str) for t in tokens)  # an integer content never reaches the client


@pytest.mark.parametrize("mode", ["int_first", "not_object_first"])
def test_a_bad_stream_before_any_text_is_an_upstream_error(fake, mode):
    with pytest.raises(UpstreamError, match="not"):
        _ask(fake, mode)


def test_no_secret_is_repeated_in_errors_or_descriptions(fake):
    with pytest.raises(UpstreamError) as caught:
        _ask(fake, "unauthorized")
    assert "401" in str(caught.value) and KEY not in str(caught.value) and "***" in str(caught.value)
    up = Upstream("http://user:hunter2pw@127.0.0.1:9/v1", "m")
    assert "hunter2pw" not in json.dumps(up.describe())
    with pytest.raises(ValueError, match="http"):
        Upstream("ftp://127.0.0.1/", "m")


def test_an_upstream_that_ignores_max_tokens_is_cut(fake):
    from loraswitch.switch.upstream import MAX_CHARS_PER_TOKEN

    answer, tokens = _ask(fake, "endless")  # 10,000 characters for max_tokens 8
    assert len(answer.text) == MAX_CHARS_PER_TOKEN * 8 == len("".join(tokens))
    assert answer.finish_reason == "length" and "past max_tokens" in answer.routing["upstream"]["error"]


def test_an_upstream_reporting_no_usage_is_counted_with_the_local_tokenizer(fake, tiny_base):
    from loraswitch.switch.escalate import Escalator
    from loraswitch.switch.escalation import Verdict
    from loraswitch.switch.request import Handle

    request = Request.chat("hi", max_tokens=8).tokenized(tiny_base)
    verdict = Verdict("upstream", 0.9, 0.5, "base", None, 0.1, 0.0, None, "test")
    answer = Escalator(Upstream(f"{fake}/ok", "m", timeout=5))._ask(Handle(request), verdict, tiny_base)
    usage = answer.routing["upstream"]["usage"]  # the fake sends no usage chunk
    assert usage["prompt_tokens"] == len(request.prompt_ids) and "estimated" in usage
    assert usage["completion_tokens"] == len(tiny_base.tokenizer.encode("Fake answer", add_special_tokens=False)) > 0


def test_odd_model_and_usage_fields_are_not_taken_for_them(fake):
    answer, _ = _ask(fake, "odd_fields")
    assert answer.text == "Fake" and answer.routing["upstream"]["usage"] is None
    assert answer.routing["upstream"]["answered_by"] == "m"
