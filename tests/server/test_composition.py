"""Adapters composed on request, over HTTP: mixtures named by `model` or `loraswitch.adapters`,
`auto` restricted by `loraswitch.allow` / `deny`, and the 400s for what cannot be served."""

from __future__ import annotations

import json

from loraswitch.switch.request import Request
from tests.server.conftest import PROMPT, library_answer


def _post(http, body: dict):
    return http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": PROMPT}],
                                                   "max_tokens": 6, "temperature": 0, **body})


def test_mixture_by_model_string_and_by_extension_field(http, lib):
    switch, _ = lib
    by_model = _post(http, {"model": "alpha:0.7+gamma:0.3", "loraswitch": {"trace": True}})
    assert by_model.status_code == 200, by_model.text
    body = by_model.json()
    routing = body["routing"]
    assert routing["mixture"] == {"alpha": 0.7, "gamma": 0.3}
    assert routing["adapters"] == ["alpha", "gamma"] and body["model"] == "alpha+gamma"
    assert routing["requested"] == "alpha:0.7+gamma:0.3"
    assert all(t["adapters"] == {"alpha": 0.7, "gamma": 0.3} for t in routing["trace"])
    by_field = _post(http, {"model": "mixture", "loraswitch": {"adapters": {"alpha": 0.7, "gamma": 0.3}}}).json()
    assert by_field["choices"][0]["message"]["content"] == body["choices"][0]["message"]["content"]
    want = library_answer(switch, Request.chat(PROMPT, model="alpha:0.7+gamma:0.3", max_tokens=6))
    assert body["choices"][0]["message"]["content"] == want.text
    alone = _post(http, {"model": "alpha"}).json()["choices"][0]["message"]["content"]
    assert _post(http, {"model": "alpha:1"}).json()["choices"][0]["message"]["content"] == alone


def _error(response) -> dict:
    assert response.status_code == 400, response.text
    return response.json()["error"]


def test_bad_mixtures_are_400s_that_name_the_field(http):
    err = _error(_post(http, {"model": "alpha:0.5+nope:0.5"}))
    assert (err["param"], err["code"]) == ("model", "unknown_adapter") and "nope" in err["message"]
    for big in ({"model": "alpha:1000000"}, {"model": "mixture", "loraswitch": {"adapters": {"alpha": 1234567}}}):
        assert "above 100" in _error(_post(http, big))["message"]  # a 400 naming the limit, never a 500
    err = _error(_post(http, {"model": "alpha:-1+beta:1"}))
    assert err["param"] == "model" and "negative" in err["message"]
    for text in ("alpha:inf", "alpha:nan+beta:1"):
        assert "finite" in _error(_post(http, {"model": text}))["message"]
    err = _error(_post(http, {"model": "mixture", "loraswitch": {"adapters": {"alpha": 1, "zeta": 1}}}))
    assert (err["param"], err["code"]) == ("loraswitch.adapters", "unknown_adapter")
    err = _error(_post(http, {"model": "mixture", "loraswitch": {"adapters": {"alpha": -0.5}}}))
    assert err["param"] == "loraswitch.adapters" and "negative" in err["message"]
    raw = json.dumps({"model": "mixture", "messages": [{"role": "user", "content": "hi"}],
                      "loraswitch": {"adapters": {"alpha": float("nan")}}})  # NaN: a JSON extension
    assert http.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}).status_code == 400
    assert _error(_post(http, {"model": "alpha", "loraswitch": {"adapters": {"alpha": 1}}}))["code"] == "conflicting_model"
    for weight in ("0.5", True):  # numbers only, as the library takes them
        r = _post(http, {"model": "mixture", "loraswitch": {"adapters": {"alpha": weight}}})
        assert r.status_code == 400 and "adapters" in str(_error(r)["param"]), r.text
    for text in ("alpha:", "alpha:0.5:0.2", "alpha:1_0"):  # malformed: the mixture's error, not a 404
        err = _error(_post(http, {"model": text}))
        assert (err["param"], err["code"]) == ("model", "invalid_mixture"), (text, err)
    assert _error(_post(http, {"model": "mixture"}))["param"] == "model"
    err = _error(_post(http, {"model": "auto", "loraswitch": {"deny": ["zeta"]}}))
    assert (err["param"], err["code"]) == ("loraswitch.deny", "unknown_adapter")
    err = _error(_post(http, {"model": "auto", "loraswitch": {"allow": ["alpha", "zeta"]}}))
    assert err["param"] == "loraswitch.allow"
    err = _error(_post(http, {"model": "beta", "loraswitch": {"deny": ["alpha"]}}))
    assert err["param"] == "loraswitch.deny" and "only apply to model 'auto'" in err["message"]
    assert _post(http, {"model": "nope"}).status_code == 404  # a plain unknown model stays model_not_found


def test_allow_and_deny_over_http(http):
    """auto here is Arrow per token (no trained selector): the trace shows who wrote each token."""
    def used(extra: dict) -> tuple[set[str], dict]:
        r = _post(http, {"model": "auto", "max_tokens": 10, "loraswitch": {"trace": True, **extra}})
        assert r.status_code == 200, r.text
        routing = r.json()["routing"]
        return {a for t in routing["trace"] for a in t["adapters"]}, routing

    free, _ = used({})
    assert free, "unrestricted routing used no adapter at all"
    only, routing = used({"allow": ["beta"]})
    assert only <= {"beta"} and routing["allow"] == ["beta"]
    denied, routing = used({"deny": sorted(free)})
    assert not denied & free and routing["deny"] == sorted(free)
