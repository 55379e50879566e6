"""The model replica's in-place engine restart (a model deployment's `user_config` changed in a
`serve deploy`), driven directly with the fake engine: no Serve, no Ray."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from deployments.engine import EngineError
from deployments.model_server import ModelServer
from serve_app.config import ConfigError
from serve_app.errors import ModelUnavailable
from serve_app.protocol import GenerateCall, Sampling

SERVER = ModelServer.func_or_class
CONFIG: dict[str, Any] = {"name": "chat", "engine": "fake", "env": {"RH_TEST_BASE": "a"},
                          "fake": {"kv_capacity_tokens": 1000, "tokens_per_s": 400}}


async def until(predicate: Callable[[], Any], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.005)


async def server(config: dict[str, Any] | None = None) -> Any:
    replica = SERVER.__new__(SERVER)
    await replica.__init__(config or CONFIG)  # Serve awaits an async __init__ the same way
    return replica


def call(max_tokens: int) -> GenerateCall:
    return GenerateCall(endpoint="completions", model="chat", request_id="r",
                        sampling=Sampling(max_tokens=max_tokens), prompts=("hello",),
                        prompt_tokens=(1,))


def finish_reason(body: dict[str, Any]) -> str:
    return str(body["choices"][0]["finish_reason"])


async def test_same_settings_restart_nothing() -> None:
    replica = await server()
    before = await replica.stats()
    await replica.reconfigure({})
    await replica.reconfigure(None)
    await replica.reconfigure({"fake": {"kv_capacity_tokens": 1000}})  # what args say already
    after = await replica.stats()
    assert (after["instance"], after["engine_restarts"]) == (before["instance"], 0)


async def test_new_settings_restart_the_engine_after_the_requests_in_flight() -> None:
    replica = await server()
    before = await replica.stats()
    running = asyncio.create_task(replica.complete(call(60)))  # ~0.15 s of decoding
    await until(lambda: replica._in_flight == 1, 5, "the request to start")
    restart = asyncio.create_task(
        replica.reconfigure({"fake": {"kv_capacity_tokens": 3000, "load_s": 0.5}}))
    await until(lambda: replica._in_flight == 0 or restart.done(), 10, "the drain")
    # The request in flight ran to its end on the old engine, not cut off by the restart.
    assert finish_reason(await running) == "length"
    assert (await replica.stats())["restarting"] == 1
    waiting = asyncio.create_task(replica.complete(call(5)))  # arrives mid-restart
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
    with pytest.raises(ConfigError, match="user_config of model-chat: fake.max_model_len"):
        await replica.reconfigure({"fake": {"max_model_len": 4096}})
    assert finish_reason(await replica.complete(call(3))) == "length"
    assert (await replica.stats())["engine_restarts"] == 0


async def test_a_failed_restart_answers_503_and_fails_the_health_check() -> None:
    replica = await server()
    with pytest.raises(EngineError, match="no weights"):
        await replica.reconfigure({"fake": {"fail_load": "no weights"}})
    with pytest.raises(ModelUnavailable, match="restart with new settings failed"):
        await replica.complete(call(3))
    with pytest.raises(EngineError):
        await replica.check_health()
