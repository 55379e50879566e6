"""The model replica driven directly with the fake engine (no Serve, no Ray): its requests
through the engine's app (whole and streamed, refusals as real errors, engine errors mapped,
stream batches), and its in-place engine restart (a model deployment's `user_config` changed in
a `serve deploy`)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from deployments.engine import EngineError
from deployments.model_server import ModelServer
from serve_app.config import ConfigError, ModelLimits
from serve_app.errors import (
    BadRequest,
    EndpointNotSupported,
    GenerationTimeout,
    ModelUnavailable,
    RateLimited,
)
from serve_app.protocol import ForwardedRequest, Reply, StreamEnd, StreamHead
from tests.fake_engine import FakeEngine

SERVER = ModelServer.func_or_class
CONFIG: dict[str, Any] = {"name": "chat", "model": "fake", "env": {"RH_TEST_BASE": "a"},
                          "engine_kwargs": {"kv_capacity_tokens": 1000, "tokens_per_s": 400}}


async def until(predicate: Callable[[], Any], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.005)


async def server(config: dict[str, Any] | None = None) -> Any:
    replica = SERVER.__new__(SERVER)
    # Serve awaits an async __init__ the same way.
    await replica.__init__(config or CONFIG, FakeEngine)
    return replica


def call(max_tokens: int, stream: bool = False, prompt: str = "hello",
         limits: ModelLimits | None = None, **extra: Any) -> ForwardedRequest:
    body = {"model": "chat", "prompt": prompt, "max_tokens": max_tokens, **extra}
    if stream:
        body["stream"] = True
    return ForwardedRequest("/v1/completions", body, "r", limits)


def finish_reason(reply: Reply) -> str:
    return str(json.loads(reply.body)["choices"][0]["finish_reason"])


async def collect(replica: Any, request: ForwardedRequest) -> list[Any]:
    return [item async for item in replica.stream(request)]


def events(items: list[Any]) -> list[dict[str, Any] | str]:
    raw = b"".join(i.body if isinstance(i, StreamHead | StreamEnd) else i for i in items)
    out: list[dict[str, Any] | str] = []
    for event in raw.decode().split("\n\n"):
        if event:
            data = event.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_a_whole_response_comes_from_the_engine_app_with_its_usage() -> None:
    replica = await server()
    reply = await replica.call(call(4, prompt="one two three"))
    assert reply.status == 200 and reply.media_type == "application/json"
    body = json.loads(reply.body)
    assert len(body["choices"][0]["text"].split()) == 4
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 4)
    assert body["usage"]["completion_tokens"] == reply.usage.completion_tokens


async def test_a_stream_is_a_head_then_batches_then_the_end_with_usage() -> None:
    replica = await server()
    items = await collect(replica, call(12, stream=True))
    assert isinstance(items[0], StreamHead) and items[0].status == 200
    assert items[0].media_type.startswith("text/event-stream")
    assert isinstance(items[-1], StreamEnd) and items[-1].usage.completion_tokens == 12
    assert all(isinstance(i, bytes) for i in items[1:-1])
    parsed = events(items)
    assert parsed[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in parsed[:-1]).split().__len__() == 12
    # 12 tokens at 400/s come in fewer items than tokens: the replica batches them.
    assert len(items) < 12


async def test_engine_errors_are_mapped_into_our_table() -> None:
    replica = await server()
    with pytest.raises(BadRequest) as bad:
        await replica.call(call(4, temperature=9))
    assert bad.value.param == "temperature" and bad.value.code == "bad_request"
    too_long = " ".join(["w"] * 3000)  # the fake engine's context is 2048
    for stream in (False, True):
        with pytest.raises(BadRequest) as context:
            if stream:
                await collect(replica, call(4, stream=True, prompt=too_long))
            else:
                await replica.call(call(4, prompt=too_long))
        assert context.value.code == "context_length_exceeded"
        assert "maximum context length is 2048 tokens" in context.value.message
    with pytest.raises(EndpointNotSupported):
        await replica.call(ForwardedRequest("/v1/embeddings", {"input": "x"}, "r"))


async def test_output_cap_refuses_or_clamps() -> None:
    replica = await server()
    capped = ModelLimits(max_output_tokens=5)
    with pytest.raises(BadRequest) as refused:
        await replica.call(call(6, limits=capped))
    assert refused.value.code == "max_tokens_exceeded" and refused.value.param == "max_tokens"
    clamped = ModelLimits(max_output_tokens=5, clamp_max_tokens=True)
    reply = await replica.call(call(50, limits=clamped))
    assert reply.usage.completion_tokens == 5 and finish_reason(reply) == "length"
    # Without max_tokens, the cap is the default.
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    reply = await replica.call(ForwardedRequest("/v1/chat/completions", body, "r", capped))
    assert reply.usage.completion_tokens <= 5


async def test_a_refused_stream_is_an_error_before_any_byte() -> None:
    config = {**CONFIG, "engine_kwargs": {"kv_capacity_tokens": 100, "tokens_per_s": 20}}
    replica = await server(config)
    limits = ModelLimits(max_queued_requests=0)
    holder = asyncio.create_task(collect(replica, call(90, stream=True, limits=limits)))
    await until(lambda: replica._admission.stats()["kv_reserved_tokens"] > 0, 5, "admission")
    with pytest.raises(RateLimited) as full:
        await collect(replica, call(90, stream=True, limits=limits))
    assert full.value.code == "queue_full" and full.value.retry_after_s
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    await until(lambda: replica._admission.stats()["kv_reserved_tokens"] == 0, 5,
                "the cancelled stream to release its reservation")
    assert replica._engine.num_unfinished() == 0


async def test_generation_timeout_is_504_whole_and_in_band_streamed() -> None:
    config = {**CONFIG, "engine_kwargs": {"tokens_per_s": 20}}
    replica = await server(config)
    limits = ModelLimits(request_timeout_s=0.3)
    with pytest.raises(GenerationTimeout):
        await replica.call(call(100, limits=limits))
    items = await collect(replica, call(100, stream=True, limits=limits))
    parsed = events(items)
    assert parsed[-1] == "[DONE]"
    error = parsed[-2]
    assert isinstance(error, dict) and error["error"]["code"] == "generation_timeout"
    assert error["error"]["request_id"] == "r"
    assert replica._engine.num_unfinished() == 0


async def test_same_settings_restart_nothing() -> None:
    replica = await server()
    before = await replica.stats()
    await replica.reconfigure({})
    await replica.reconfigure(None)
    await replica.reconfigure({"engine_kwargs": {"kv_capacity_tokens": 1000}})  # what args say already
    after = await replica.stats()
    assert (after["instance"], after["engine_restarts"]) == (before["instance"], 0)


async def test_new_settings_restart_the_engine_after_the_requests_in_flight() -> None:
    replica = await server()
    before = await replica.stats()
    running = asyncio.create_task(replica.call(call(60)))  # ~0.15 s of decoding
    await until(lambda: replica._in_flight == 1, 5, "the request to start")
    restart = asyncio.create_task(
        replica.reconfigure({"engine_kwargs": {"kv_capacity_tokens": 3000, "load_s": 0.5}}))
    await until(lambda: replica._in_flight == 0 or restart.done(), 10, "the drain")
    # The request in flight ran to its end on the old engine, not cut off by the restart.
    assert finish_reason(await running) == "length"
    assert (await replica.stats())["restarting"] == 1
    waiting = asyncio.create_task(replica.call(call(5)))  # arrives mid-restart
    await until(lambda: restart.done(), 10, "the new engine")
    await restart
    assert finish_reason(await waiting) == "length"
    after = await replica.stats()
    assert after["engine_restarts"] == 1 and after["restarting"] == 0
    assert after["instance"] != before["instance"]
    assert after["kv_capacity_tokens"] == after["kv_budget_tokens"] == 3000

    await replica.reconfigure({})  # the entry removed again: back to the args' settings
    assert (await replica.stats())["kv_capacity_tokens"] == 1000


async def test_env_settings_apply_and_are_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RH_TEST_BASE", "a")  # what Ray's runtime_env sets from the args
    monkeypatch.delenv("RH_TEST_NEW", raising=False)
    replica = await server()
    await replica.reconfigure({"env": {"RH_TEST_NEW": "1", "RH_TEST_BASE": None}})
    assert os.environ.get("RH_TEST_NEW") == "1" and "RH_TEST_BASE" not in os.environ
    await replica.reconfigure({"env": {"RH_TEST_BASE": "b"}})
    assert os.environ.get("RH_TEST_BASE") == "b" and "RH_TEST_NEW" not in os.environ
    await replica.reconfigure({})
    assert os.environ.get("RH_TEST_BASE") == "a" and "RH_TEST_NEW" not in os.environ
    assert (await replica.stats())["engine_restarts"] == 3


async def test_invalid_settings_are_refused_before_the_engine_is_touched() -> None:
    replica = await server()
    with pytest.raises(ConfigError, match="user_config of model-chat: start_timeout_s"):
        await replica.reconfigure({"start_timeout_s": -1})
    assert finish_reason(await replica.call(call(3))) == "length"
    assert (await replica.stats())["engine_restarts"] == 0


async def test_a_failed_restart_answers_503_and_fails_the_health_check() -> None:
    replica = await server()
    with pytest.raises(EngineError, match="no weights"):
        await replica.reconfigure({"engine_kwargs": {"fail_load": "no weights"}})
    with pytest.raises(ModelUnavailable, match="restart with new settings failed"):
        await replica.call(call(3))
    with pytest.raises(EngineError):
        await replica.check_health()
