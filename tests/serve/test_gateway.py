"""Gateway duties through the real ingress with the official `openai` client: API keys, model
permissions, per-key rate limits with OpenAI's headers, input hardening, the error classes the
client raises (Ray Serve with the fake engine)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from serve_app.auth import hash_key
from tests.conftest import wait_until

pytestmark = pytest.mark.serve

ADMIN, USER, LIMITED, TOKENS = "rh-admin-key", "rh-user-key", "rh-limited-key", "rh-tokens-key"
KEYS = [
    {"name": "ops", "sha256": hash_key(ADMIN), "admin": True},
    {"name": "alice", "sha256": hash_key(USER), "models": ["small"]},
    {"name": "bob", "sha256": hash_key(LIMITED), "requests_per_minute": 2},
    {"name": "carol", "sha256": hash_key(TOKENS), "tokens_per_minute": 60},
]
ARGS: dict[str, Any] = {
    "default_model": "chat",
    "routing": {"rules": [{"name": "code", "when": {"code": True}, "model": "code"}],
                "fallbacks": {"code": "chat"}},
    "models": [
        {"name": "chat", "model": "fake", "pinned": True, "aliases": ["small"],
         "limits": {"max_output_tokens": 64}},
        {"name": "code", "model": "fake", "pinned": True, "limits": {"max_output_tokens": 64}},
    ],
    "auth": {"keys": KEYS},
    "ingress": {"max_body_bytes": 4096, "max_messages": 8, "max_input_chars": 2000},
}
HELLO = [{"role": "user", "content": "hello there"}]
CODE = [{"role": "user", "content": "Fix this:\n```python\ndef f(x):\n    return x +\n```"}]


@pytest.fixture(scope="module")
def base_url(deploy: Any) -> str:
    return deploy(ARGS)


def client(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)


def test_missing_or_wrong_key_is_401_and_health_stays_open(base_url: str) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        client(base_url, "rh-not-a-key").models.list()
    assert info.value.status_code == 401
    assert info.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    bare = httpx.get(f"{base_url}/v1/models", timeout=10)
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "missing_api_key"
    assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200
    # Without a key, even which paths exist is not shown.
    assert httpx.get(f"{base_url}/v1/nope", timeout=10).status_code == 401


def test_model_permissions(base_url: str) -> None:
    alice = client(base_url, USER)
    assert [m.id for m in alice.models.list().data] == ["chat"]
    with pytest.raises(openai.NotFoundError):
        alice.models.retrieve("code")
    with pytest.raises(openai.PermissionDeniedError) as info:
        alice.chat.completions.create(model="code", messages=HELLO, max_tokens=4)
    assert info.value.status_code == 403 and "alice" in info.value.message
    ok = alice.chat.completions.with_raw_response.create(model="small", messages=HELLO,
                                                         max_tokens=4)
    assert ok.headers["x-roundhouse-model"] == "chat"
    # Routed (not named): a code request goes to the first model alice may use.
    routed = alice.chat.completions.with_raw_response.create(model="auto", messages=CODE,
                                                            max_tokens=4)
    assert routed.headers["x-roundhouse-model"] == "chat"
    assert routed.headers["x-roundhouse-fallback-from"] == "code"
    ops = client(base_url, ADMIN)
    assert {m.id for m in ops.models.list().data} == {"chat", "code"}
    assert ops.chat.completions.with_raw_response.create(
        model="auto", messages=CODE, max_tokens=4).headers["x-roundhouse-model"] == "code"


def test_status_needs_an_admin_key(base_url: str) -> None:
    denied = httpx.get(f"{base_url}/v1/status", headers={"authorization": f"Bearer {USER}"},
                       timeout=10)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "admin_required"
    status = httpx.get(f"{base_url}/v1/status", headers={"authorization": f"Bearer {ADMIN}"},
                       timeout=10)
    assert status.status_code == 200 and set(status.json()["models"]) == {"chat", "code"}


def test_requests_per_minute_with_openai_headers(base_url: str) -> None:
    bob = client(base_url, LIMITED)
    first = bob.chat.completions.with_raw_response.create(model="chat", messages=HELLO,
                                                          max_tokens=2)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    bob.chat.completions.create(model="chat", messages=HELLO, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as info:
        bob.chat.completions.create(model="chat", messages=HELLO, max_tokens=2)
    headers = info.value.response.headers
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert info.value.body["code"] == "requests_limit_exceeded"  # type: ignore[index]
    assert bob.models.list().data  # listing models does not count


def test_tokens_per_minute_are_charged_with_the_usage(base_url: str) -> None:
    carol = client(base_url, TOKENS)
    # Fake tokens are words: 2 prompt + 20 output = 22 of 60, charged once the usage is known.
    first = carol.completions.with_raw_response.create(model="chat", prompt="hello there",
                                                       max_tokens=20)
    assert first.headers["x-ratelimit-limit-tokens"] == "60"
    assert first.headers["x-ratelimit-remaining-tokens"] == "60"
    second = carol.completions.with_raw_response.create(model="chat", prompt="hello there",
                                                        max_tokens=20)
    assert 38 <= int(second.headers["x-ratelimit-remaining-tokens"]) <= 39  # refill: ~1/s
    # Streamed usage is charged too (the stream's end carries it), then the key is in debt.
    list(carol.completions.create(model="chat", prompt="hello there", max_tokens=20,
                                  stream=True))
    with pytest.raises(openai.RateLimitError, match="tokens per minute") as info:
        carol.completions.create(model="chat", prompt="hello there", max_tokens=20)
    assert info.value.body["code"] == "tokens_limit_exceeded"  # type: ignore[index]
    assert int(info.value.response.headers["retry-after"]) >= 1


def raw(base_url: str, body: bytes | str, headers: dict[str, str] | None = None,
        path: str = "/v1/chat/completions") -> httpx.Response:
    sent = {"authorization": f"Bearer {ADMIN}", "content-type": "application/json",
            **(headers or {})}
    return httpx.post(f"{base_url}{path}", content=body, headers=sent, timeout=30)


@pytest.mark.parametrize("body, headers, status, code", [
    ("hello", {"content-type": "text/plain"}, 415, "unsupported_media_type"),
    ("x" * 5000, {}, 413, "payload_too_large"),
    (json.dumps({"model": "chat", "messages": HELLO * 9}), {}, 400, "too_many_messages"),
    (json.dumps({"model": "chat", "messages": [{"role": "user", "content": "y" * 2001}]}), {},
     400, "input_too_long"),
    ("{not json", {}, 400, "bad_request"),
    (json.dumps({"model": "chat", "messages": HELLO, "max_tokens": 65}), {}, 400,
     "max_tokens_exceeded"),
    (json.dumps({"model": "nope", "messages": HELLO}), {}, 404, "model_not_found"),
])
def test_bad_input_gets_an_openai_error_with_the_request_id(
        base_url: str, body: str, headers: dict[str, str], status: int, code: str) -> None:
    resp = raw(base_url, body, {"x-request-id": "req-42", **headers})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    assert error["request_id"] == "req-42" and resp.headers["x-request-id"] == "req-42"


def test_a_request_id_is_made_when_the_client_sends_none(base_url: str) -> None:
    resp = raw(base_url, "{}")
    assert resp.status_code == 400
    assert resp.json()["error"]["request_id"] == resp.headers["x-request-id"] != ""


def test_unknown_fields_are_ignored_and_json_with_charset_is_fine(base_url: str) -> None:
    body = {"model": "chat", "messages": HELLO, "max_tokens": 3, "some_future_field": [1, 2]}
    resp = raw(base_url, json.dumps(body), {"content-type": "application/json; charset=utf-8"})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3


def test_openai_client_errors_and_streaming_usage(base_url: str) -> None:
    ops = client(base_url, ADMIN)
    with pytest.raises(openai.BadRequestError) as info:
        ops.chat.completions.create(model="chat", messages=HELLO, temperature=5)
    assert info.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        ops.completions.create(model="missing", prompt="hi")
    stream = ops.chat.completions.create(model="chat", messages=HELLO, max_tokens=5, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    text = ops.completions.create(model="chat", prompt="one two", max_tokens=4, n=2)
    assert len(text.choices) == 2 and text.usage and text.usage.completion_tokens == 8
    wait_until(lambda: httpx.get(f"{base_url}/health", timeout=5).status_code == 200, 10,
               "the server to stay healthy")
