"""Fuzzing the running ingress with hypothesis-made request bodies, headers, paths and methods
(Ray Serve, fake engine): never a 500, never a hang, every refusal an OpenAI error body, and the
server healthy after. Bounded: a few hundred examples, a 30 s timeout on every request."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_app.auth import hash_key

pytestmark = pytest.mark.serve

KEY = "rh-fuzz-key"
ARGS: dict[str, Any] = {
    "default_model": "chat",
    "routing": {"rules": [{"name": "code", "when": {"code": True}, "model": "code"}]},
    "models": [
        {"name": "chat", "model": "fake", "pinned": True, "engine_kwargs": {"tokens_per_s": 5000},
         "limits": {"max_output_tokens": 32, "queue_timeout_s": 5}},
        {"name": "code", "model": "fake", "pinned": True, "engine_kwargs": {"tokens_per_s": 5000},
         "limits": {"max_output_tokens": 32, "clamp_max_tokens": True}},
    ],
    "auth": {"keys": [{"name": "fuzz", "sha256": hash_key(KEY), "admin": True,
                       "requests_per_minute": 100000}]},
    "ingress": {"max_body_bytes": 65536, "max_messages": 16, "max_input_chars": 20000},
}
DECLARED = {200, 400, 401, 403, 404, 405, 413, 415, 429}
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/route", "/v1/models",
         "/v1/models/chat", "/v1/status", "/health"]

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=10)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer"]) | json_values},
    optional={"content": st.text(max_size=300) | json_values,
              "name": st.text(max_size=10)}), max_size=5)
bodies = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["chat", "code", "auto", "nope", ""]) | json_values,
    "messages": messages | json_values,
    "prompt": st.text(max_size=300) | st.lists(st.text(max_size=50), max_size=4) | json_values,
    "max_tokens": st.integers(-3, 64) | json_values,
    "max_completion_tokens": st.integers(-3, 64) | json_values,
    "temperature": st.floats(-1, 3) | json_values,
    "top_p": st.floats(-1, 2) | json_values,
    "n": st.integers(-1, 20) | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=20) | json_values,
    "seed": st.integers(-(2**70), 2**70) | json_values,
    "presence_penalty": st.floats(-3, 3) | json_values,
    "logprobs": json_values, "tools": json_values, "metadata": json_values,
    "extra_field": json_values,
})
# Visible ASCII and inner spaces: HTTP strips spaces around a header value, and the client
# (h11) refuses to send a value that starts or ends with one.
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=200).map(
    str.strip)
headers = st.fixed_dictionaries({}, optional={
    "authorization": st.sampled_from([f"Bearer {KEY}", "Bearer nope", "Basic x", "", KEY]),
    "content-type": st.sampled_from(["application/json", "text/plain", "application/x-www-form"
                                     "-urlencoded", "application/json; charset=utf-8", ""]),
    "x-request-id": header_text,
    "x-roundhouse-quality": header_text,
})


@pytest.fixture(scope="module")
def base_url(deploy: Any) -> str:
    return deploy(ARGS)


@pytest.fixture(scope="module")
def http(base_url: str) -> Any:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        yield client


def check(resp: httpx.Response) -> None:
    assert resp.status_code in DECLARED, (resp.status_code, resp.text[:500])
    if resp.status_code == 200:
        return
    error = resp.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] and error["request_id"]
    if resp.headers["x-request-id"]:  # an empty one sent is echoed empty; the body has a new one
        assert error["request_id"] == resp.headers["x-request-id"]


def send(http: httpx.Client, method: str, path: str, content: bytes,
         sent_headers: dict[str, str]) -> httpx.Response:
    with http.stream(method, path, content=content, headers=sent_headers) as resp:
        resp.read()  # a stream must end (the client timeout catches a hang)
    return resp


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/route"]),
       body=bodies, sent_headers=headers)
def test_generated_bodies_never_break_the_server(http: httpx.Client, path: str,
                                                 body: dict[str, Any],
                                                 sent_headers: dict[str, str]) -> None:
    check(send(http, "POST", path, json.dumps(body).encode(), sent_headers))


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
       path=st.sampled_from(PATHS) | st.text(st.characters(min_codepoint=33, max_codepoint=126,
                                                           exclude_characters="?#%"),
                                             max_size=30).map(lambda p: "/" + p),
       content=st.binary(max_size=300) | st.just(b"[]") | st.just(b"null") | st.just(b"1e999"),
       sent_headers=headers)
def test_generated_requests_of_any_shape(http: httpx.Client, method: str, path: str,
                                         content: bytes, sent_headers: dict[str, str]) -> None:
    check(send(http, method, path, content, sent_headers))


def test_the_server_is_healthy_after_the_fuzzing(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    resp = http.post("/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                     json={"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": 3})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
