"""The ingress and model replicas on real Ray Serve and real HTTP, with the fake engine."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import model_handle, wait_until

pytestmark = pytest.mark.serve

FAKE_ARGS: dict[str, Any] = {
    "default_model": "chat",
    "ingress": {"max_body_bytes": 4096},
    "models": [
        {"name": "chat", "model": "fake", "aliases": ["small"],
         "engine_kwargs": {"tokens_per_s": 400, "max_model_len": 64}},
        {"name": "code", "model": "fake", "engine_kwargs": {"tokens_per_s": 50}},
    ],
}


@pytest.fixture(scope="module")
def base_url(deploy: Any) -> str:
    return deploy(FAKE_ARGS)


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "chat", "messages": [{"role": "user", "content": "hello there"}], **extra}


def test_chat_non_streaming_has_openai_shape(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hello there"}], max_tokens=5)
    assert resp.object == "chat.completion"
    assert resp.model == "chat"
    assert resp.choices[0].message.role == "assistant"
    assert len(resp.choices[0].message.content.split()) == 5
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == 2 and resp.usage.completion_tokens == 5
    assert resp.usage.total_tokens == 7


def test_chat_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hello there"}], max_tokens=6,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert len(text.split()) == 6
    assert content[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    # Streamed and non-streamed answers are the same deterministic text.
    full = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hello there"}], max_tokens=6)
    assert full.choices[0].message.content == text


def test_raw_sse_framing_ends_with_done(base_url: str) -> None:
    with httpx.stream("POST", f"{base_url}/v1/chat/completions",
                      json=chat_body(stream=True, max_tokens=3), timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-roundhouse-model"] == "chat"
        raw = "".join(resp.iter_text())
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])


def test_auto_and_alias_route_to_models(client: openai.OpenAI, base_url: str) -> None:
    for name, expected in (("auto", "chat"), ("small", "chat"), ("code", "code")):
        resp = httpx.post(f"{base_url}/v1/chat/completions",
                          json=chat_body(model=name, max_tokens=2), timeout=30)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-roundhouse-model"] == expected
    missing = httpx.post(f"{base_url}/v1/chat/completions",
                         json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert missing.headers["x-roundhouse-model"] == "chat"


def test_completions_batch_and_n(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="code", prompt=["one two", "three"], max_tokens=3, n=2)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert all(len(c.text.split()) == 3 for c in resp.choices)
    assert resp.usage.prompt_tokens == 3
    assert resp.usage.completion_tokens == 12


def test_completions_streaming(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model="code", prompt="a b c", max_tokens=4,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks).split().__len__() == 4
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_list_and_get(client: openai.OpenAI, base_url: str) -> None:
    assert [m.id for m in client.models.list()] == ["chat", "code"]
    assert client.models.retrieve("code").id == "code"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert set(body) == {"message", "type", "param", "code", "request_id"}
    assert body["request_id"] == resp.headers["x-request-id"]
    assert "Traceback" not in body["message"]
    return body


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b"\xff\xfe", b"null"])
def test_invalid_json_is_400(base_url: str, content: bytes) -> None:
    resp = httpx.post(f"{base_url}/v1/chat/completions", content=content,
                      headers={"content-type": "application/json"})
    _error(resp, 400)


@pytest.mark.parametrize("body,param", [
    # What the gateway reads for routing: refused there, before any model is asked.
    ({"model": "chat"}, "messages"),
    ({"model": "chat", "messages": []}, "messages"),
    ({"model": "chat", "messages": [{"content": "x"}]}, "messages.0.role"),
    ({"model": ["chat"], "messages": [{"role": "user", "content": "x"}]}, "model"),
    # The rest is the engine's validation (vLLM's, in production), mapped into our errors.
    (chat_body(temperature=5), "temperature"),
    (chat_body(max_tokens=0), "max_tokens"),
    (chat_body(max_tokens="many"), "max_tokens"),
    (chat_body(n=0), "n"),
    (chat_body(top_p=0), "top_p"),
])
def test_schema_and_value_errors_are_400(base_url: str, body: dict[str, Any],
                                         param: str | None) -> None:
    for stream in (False, True):
        err = _error(httpx.post(f"{base_url}/v1/chat/completions",
                                json={**body, "stream": stream}), 400)
        assert err["type"] == "invalid_request_error"
        assert isinstance(err["code"], str)
        assert err["param"] == param


def test_openai_client_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert "nope" in str(not_found.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}],
                                       temperature=-1)


def test_prompt_longer_than_context_is_400_stream_or_not(base_url: str) -> None:
    long = " ".join(["word"] * 100)  # the fake chat model's context is 64
    for stream in (False, True):
        body = {"model": "chat", "messages": [{"role": "user", "content": long}],
                "stream": stream}
        err = _error(httpx.post(f"{base_url}/v1/chat/completions", json=body), 400)
        assert err["code"] == "context_length_exceeded"
        assert "maximum context length is 64 tokens" in err["message"]
        assert "100" in err["message"]
    # A prompt that fits, with more max_tokens than the context leaves: the output is cut at
    # the context's end (as vLLM does), not refused.
    resp = httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(max_tokens=63))
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 62


def test_body_over_limit_is_413(base_url: str) -> None:
    big = chat_body(messages=[{"role": "user", "content": "x" * 5000}])
    _error(httpx.post(f"{base_url}/v1/chat/completions", json=big), 413)

    def chunks() -> Any:
        for _ in range(10):
            yield b" " * 1000  # chunked, no content-length
    resp = httpx.post(f"{base_url}/v1/chat/completions", content=chunks(),
                      headers={"content-type": "application/json"})
    _error(resp, 413)


def test_unknown_route_and_method(base_url: str) -> None:
    assert _error(httpx.get(f"{base_url}/v1/nothing"), 404)["code"] == "not_found"
    assert _error(httpx.get(f"{base_url}/v1/chat/completions"), 405)


def test_request_id_is_echoed(base_url: str) -> None:
    resp = httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(model="nope"),
                      headers={"x-request-id": "abc-123"})
    assert resp.status_code == 404
    assert resp.headers["x-request-id"] == "abc-123"


def test_unknown_fields_are_ignored(base_url: str) -> None:
    resp = httpx.post(f"{base_url}/v1/chat/completions",
                      json=chat_body(max_tokens=2, some_future_field={"x": 1}), timeout=30)
    assert resp.status_code == 200


def test_client_disconnect_aborts_engine_request(base_url: str) -> None:
    handle = model_handle("code")  # 50 tokens/s: a 2,000-token answer takes 40 s
    body = {"model": "code", "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        wait_until(lambda: handle.stats.remote().result()["unfinished_requests"] == 1, 10,
                   "the engine to hold the streaming request")
    wait_until(lambda: handle.stats.remote().result()["unfinished_requests"] == 0, 10,
               "the engine request to be aborted after the client left")


def test_bad_requests_do_not_harm_the_server(client: openai.OpenAI, base_url: str) -> None:
    for content in (b"{", b"[]", b'{"messages": 5}', b'{"model": 1, "messages": []}'):
        httpx.post(f"{base_url}/v1/chat/completions", content=content)
    resp = client.chat.completions.create(
        model="code", messages=[{"role": "user", "content": "still there?"}], max_tokens=2)
    assert resp.choices[0].message.content
