"""The ingress's residency client against a stand-in controller: a slow controller (a loaded
machine) delays requests for cold models but never turns them into "not reachable" errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from serve_app import residency_client
from serve_app.controller import PROTOCOL_VERSION
from serve_app.errors import ModelUnavailable
from serve_app.residency_client import ResidencyClient


class _Method:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn

    def remote(self, *args: Any) -> Any:
        return self._fn(*args)


class SlowController:
    """Answers heartbeats after `delay_s`; ensure_ready at once."""

    def __init__(self) -> None:
        self.delay_s = 0.0
        self.ready_calls: list[str] = []
        self.heartbeat = _Method(self._heartbeat)
        self.ensure_ready = _Method(self._ensure_ready)
        self.configure = _Method(self._configure)

    async def _configure(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"version": PROTOCOL_VERSION}

    async def _heartbeat(self, counts: dict[str, int], busy: list[str]) -> dict[str, Any]:
        await asyncio.sleep(self.delay_s)
        return {"configured": True, "serving": {"chat": True}}

    async def _ensure_ready(self, model: str, *usage: Any) -> None:
        self.ready_calls.append(model)


async def _until(predicate: Callable[[], bool], timeout_s: float = 5) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110  # a condition poll with a deadline
            await asyncio.sleep(0.01)


@pytest.fixture
def controller(monkeypatch: pytest.MonkeyPatch) -> SlowController:
    actor = SlowController()
    monkeypatch.setattr(residency_client, "get_or_create", lambda app: actor)
    monkeypatch.setattr(residency_client, "lookup", lambda app: actor)
    monkeypatch.setattr(residency_client, "HEARTBEAT_S", 0.01)
    monkeypatch.setattr(residency_client, "HEARTBEAT_TIMEOUT_S", 0.05)
    return actor


async def test_a_slow_heartbeat_keeps_the_controller_handle(controller: SlowController) -> None:
    client = ResidencyClient("app", {})
    await client.start()
    try:
        await _until(lambda: client._serving.get("chat", False))
        await client.ready("chat")  # fresh heartbeat: no call to the controller
        assert controller.ready_calls == []
        controller.delay_s = 1.0  # every heartbeat now times out
        await _until(lambda: client._failing)
        assert client._actor is controller
        # Past the heartbeat's lease, a request asks the controller directly and is served.
        await asyncio.sleep(residency_client.INGRESS_LEASE_S)
        await client.ready("chat")
        assert controller.ready_calls == ["chat"]
    finally:
        assert client._task is not None
        client._task.cancel()


async def test_a_dead_controller_is_looked_up_again(controller: SlowController,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    client = ResidencyClient("app", {})
    await client.start()
    try:
        found: list[Any] = [None]
        monkeypatch.setattr(residency_client, "lookup", lambda app: found[0])

        async def dead(*args: Any) -> Any:
            raise RuntimeError("actor died")

        controller.heartbeat = _Method(dead)
        await _until(lambda: client._actor is None)
        with pytest.raises(ModelUnavailable, match="not reachable"):
            await client.ready("code")
        found[0] = controller  # restarted: the next request finds it without waiting a beat
        await client.ready("code")
        assert controller.ready_calls == ["code"]
    finally:
        assert client._task is not None
        client._task.cancel()
