"""The residency controller's state machine without Ray: a fake actuator, a fake clock, and
Serve's replica counts fed in by hand the way the autoscaling policy reports them."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app.autoscaling import decide
from serve_app.cli import status_table
from serve_app.controller import ResidencyController
from serve_app.errors import ModelUnavailable
from serve_app.policy.residency import failure_backoff_s


class DeploymentId(NamedTuple):
    name: str
    app_name: str


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeActuator:
    def __init__(self) -> None:
        self.in_flight_by_model: dict[str, int] = {}
        self.drained: list[str] = []
        self.freed = True
        self.gpu_free: float | None = None

    async def drain(self, model: str) -> None:
        self.drained.append(model)

    async def in_flight(self, model: str) -> int:
        return self.in_flight_by_model.get(model, 0)

    def memory_freed(self, pids: list[tuple[int, float]], node_id: str | None) -> bool:
        return self.freed

    def free_gpu_gib(self) -> float | None:
        return self.gpu_free


def config(**residency: Any) -> dict[str, Any]:
    return {"models": [
        {"name": "chat", "model": "fake", "memory_gib": 2, "pinned": True},
        {"name": "code", "model": "fake", "memory_gib": 2},
        {"name": "reasoning", "model": "fake", "memory_gib": 2}],
        "residency": {"gpu_memory_gib": 4, **residency}}


@dataclass
class Rig:
    core: ResidencyController
    clock: Clock
    actuator: FakeActuator
    running: dict[str, int]
    broken: set[str]

    def serve_tick(self) -> dict[str, int]:
        """What Serve does each tick: report replicas, then apply the desired counts."""
        desired = self.core.observe({f"model-{n}": {"current": r, "target": r}
                                     for n, r in self.running.items()})["targets"]
        for dep, want in desired.items():
            name = dep.removeprefix("model-")
            self.running[name] = 0 if name in self.broken else want
        return desired

    def state(self, model: str) -> str:
        return str(self.core.status()["models"][model]["state"])


def rig(gpu_free: float | None = None, **residency: Any) -> Rig:
    clock, actuator = Clock(), FakeActuator()
    actuator.gpu_free = gpu_free
    core = ResidencyController(actuator, clock, sleep=lambda _: asyncio.sleep(0))
    core.configure(config(**residency))
    return Rig(core, clock, actuator, {"chat": 0, "code": 0, "reasoning": 0}, set())


async def settle(r: Rig, until: Any, ticks: int = 400) -> None:
    for _ in range(ticks):
        if until():
            return
        r.clock.now += 0.1
        r.serve_tick()
        await asyncio.sleep(0)
    raise AssertionError(f"did not settle: {r.core.status()}")


async def test_pinned_model_loads_at_configure_and_becomes_active() -> None:
    r = rig()
    assert r.serve_tick() == {"model-chat": 1, "model-code": 0, "model-reasoning": 0}
    await settle(r, lambda: r.state("chat") == "active")
    assert r.core.heartbeat({}, [])["serving"] == {"chat": True, "code": False,
                                                    "reasoning": False}


async def test_swap_waits_for_drain_and_memory_before_loading() -> None:
    r = rig()
    await settle(r, lambda: r.state("chat") == "active")
    task = asyncio.ensure_future(r.core.ensure_ready("code"))
    await settle(r, task.done)
    r.actuator.in_flight_by_model["code"] = 1
    r.actuator.freed = False
    swap = asyncio.ensure_future(r.core.ensure_ready("reasoning"))
    await settle(r, lambda: r.state("code") == "draining")
    for _ in range(50):  # a request still runs on code: no stop, no load
        r.clock.now += 0.1
        r.serve_tick()
        await asyncio.sleep(0)
    assert r.running["code"] == 1 and r.state("reasoning") == "cold"
    r.actuator.in_flight_by_model["code"] = 0
    await settle(r, lambda: r.running["code"] == 0)
    assert r.state("code") == "draining" and r.state("reasoning") == "cold"  # memory not free
    r.actuator.freed = True
    await settle(r, swap.done)
    assert swap.exception() is None
    held = r.core.status()["held_gib"]
    assert held <= 4 and r.state("code") == "cold" and r.state("chat") == "active"
    messages = [d["message"] for d in r.core.status()["decisions"]]
    assert "evict code: least recently used, reasoning needs 2.0 GiB, free 0.0 GiB" in messages


async def test_failure_backs_off_exponentially_and_recovers() -> None:
    r = rig(failure_backoff_s=5, max_failure_backoff_s=60)
    await settle(r, lambda: r.state("chat") == "active")
    first = asyncio.ensure_future(r.core.ensure_ready("code"))
    await settle(r, lambda: r.state("code") == "loading")
    r.core.model_failed("code", "CUDA out of memory")
    await settle(r, first.done)
    with pytest.raises(ModelUnavailable, match="code failed to load: CUDA out of memory"):
        first.result()
    with pytest.raises(ModelUnavailable) as again:
        await r.core.ensure_ready("code")
    assert again.value.retry_after_s is not None and 0 < again.value.retry_after_s <= 5
    assert r.running["code"] == 0
    r.clock.now += 5
    second = asyncio.ensure_future(r.core.ensure_ready("code"))
    await settle(r, lambda: r.state("code") in ("loading", "active"))
    r.core.model_failed("code", "still broken")
    await settle(r, second.done)
    assert isinstance(second.exception(), ModelUnavailable)
    assert r.core.status()["models"]["code"]["retry_in_s"] == pytest.approx(10, abs=0.5)
    r.clock.now += 10
    third = asyncio.ensure_future(r.core.ensure_ready("code"))
    await settle(r, third.done)
    assert third.exception() is None and r.core.status()["models"]["code"]["failures"] == 0


async def test_a_lost_replica_is_marked_cold_and_reloaded_on_demand() -> None:
    r = rig()
    await settle(r, lambda: r.state("chat") == "active")
    task = asyncio.ensure_future(r.core.ensure_ready("code"))
    await settle(r, task.done)
    r.broken.add("code")  # the replica died; Serve has none running for a while
    await settle(r, lambda: r.state("code") == "cold", ticks=30)
    assert r.core.status()["models"]["code"]["desired_replicas"] == 0
    r.broken.clear()
    again = asyncio.ensure_future(r.core.ensure_ready("code"))
    await settle(r, again.done)
    assert again.exception() is None and r.running["code"] == 1


async def test_an_engine_restart_in_place_is_not_a_lost_replica() -> None:
    r = rig()
    await settle(r, lambda: r.state("chat") == "active")
    r.core.model_restarting("chat", within_s=60)
    assert r.core.status()["models"]["chat"]["restarting_engine"]
    table = status_table(r.core.status(), r.clock.now)
    assert re.search(r"^chat\s+active \(pinned\) \(engine restarting\)", table, re.M), table
    r.broken.add("chat")  # Serve counts the updating replica as not running
    for _ in range(100):  # 10 s, far past the grace for a lost replica
        r.clock.now += 0.1
        r.serve_tick()
    assert r.state("chat") == "active"
    assert r.core.status()["models"]["chat"]["desired_replicas"] == 1
    waiting = asyncio.ensure_future(r.core.ensure_ready("chat"))  # waits for it, no new load
    await asyncio.sleep(0)
    assert not waiting.done()
    r.broken.clear()
    r.core.model_ready("chat", [(1, 1.0)], None)
    await settle(r, waiting.done)
    assert waiting.exception() is None
    assert not r.core.status()["models"]["chat"]["restarting_engine"]
    assert "restarted chat" in r.core.status()["models"]["chat"]["last_decision"]["message"]

    began = r.clock.now
    r.core.model_restarting("chat", within_s=5)  # one that never comes back
    r.broken.add("chat")
    await settle(r, lambda: r.state("chat") != "active", ticks=100)
    assert r.clock.now >= began + 5  # lost, but not before its time ran out


async def test_gpu_memory_probe_holds_a_load_until_the_device_has_room() -> None:
    r = rig(gpu_free=0.5, memory_probe_timeout_s=5)
    await settle(r, lambda: r.state("chat") == "cold" and bool(r.core.status()["models"]["chat"][
        "blocked"]), ticks=3)
    assert "accelerator memory" in r.core.status()["models"]["chat"]["blocked"]
    assert r.running["chat"] == 0
    r.actuator.gpu_free = 40.0
    await settle(r, lambda: r.state("chat") == "active")


def test_failure_backoff_doubles_up_to_the_cap() -> None:
    assert [failure_backoff_s(n, 5, 60) for n in range(6)] == [0, 5, 10, 20, 40, 60]


def test_policy_leaves_cold_models_and_unknown_deployments_out() -> None:
    def ctx(name: str, current: int, target: int) -> tuple[Any, Any]:
        dep = DeploymentId(name, "roundhouse")
        return dep, SimpleNamespace(current_num_replicas=current, target_num_replicas=target)

    contexts = dict([ctx("ingress", 1, 1), ctx("model-chat", 1, 1), ctx("model-code", 0, 0),
                     ctx("model-old", 1, 1), ctx("model-new", 0, 0)])
    targets = {"model-chat": 1, "model-code": 0, "model-old": 0, "model-new": 1}
    decided = {dep.name: n for dep, n in decide(contexts, targets).items()}
    assert decided == {"model-chat": 1, "model-old": 0, "model-new": 1}


OPS = st.lists(st.tuples(st.sampled_from(["ask", "tick", "fail", "busy", "idle"]),
                         st.sampled_from(["chat", "code", "reasoning", "extra"])),
               min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(OPS)
def test_random_demand_never_exceeds_the_budget_or_touches_pinned(ops: list[Any]) -> None:
    """Whatever arrives in whatever order: the memory of replicas Serve runs never exceeds the
    budget, the pinned model is never drained, and no model is loaded twice at once."""

    async def run() -> None:
        clock, actuator = Clock(), FakeActuator()
        core = ResidencyController(actuator, clock, sleep=lambda _: asyncio.sleep(0))
        core.configure({"models": [
            {"name": "chat", "model": "fake", "memory_gib": 2, "pinned": True},
            {"name": "code", "model": "fake", "memory_gib": 2},
            {"name": "reasoning", "model": "fake", "memory_gib": 3},
            {"name": "extra", "model": "fake", "memory_gib": 1}],
            "residency": {"gpu_memory_gib": 5, "load_timeout_s": 30}})
        r = Rig(core, clock, actuator, {"chat": 0, "code": 0, "reasoning": 0, "extra": 0}, set())
        memory = {"chat": 2, "code": 2, "reasoning": 3, "extra": 1}
        waiters: list[asyncio.Future[None]] = []

        def check() -> None:
            status = core.status()
            assert status["held_gib"] <= 5 + 1e-9
            assert sum(memory[n] for n, k in r.running.items() if k) <= 5
            assert status["models"]["chat"]["state"] != "draining"

        for op, model in ops:
            if op == "ask":
                waiters.append(asyncio.ensure_future(core.ensure_ready(model)))
            elif op == "fail":
                core.model_failed(model, "boom")
            elif op == "busy":
                actuator.in_flight_by_model[model] = 1
            elif op == "idle":
                actuator.in_flight_by_model[model] = 0
            for _ in range(5):
                clock.now += 0.1
                r.serve_tick()
                await asyncio.sleep(0)
                check()
        actuator.in_flight_by_model.clear()
        for _ in range(400):
            if all(w.done() for w in waiters):
                break
            clock.now += 0.1
            r.serve_tick()
            await asyncio.sleep(0)
            check()
        assert all(w.done() for w in waiters), core.status()
        for w in waiters:
            if w.exception() is not None:
                assert isinstance(w.exception(), ModelUnavailable)
        loading: set[str] = set()
        for d in core.status()["decisions"]:
            verb, _, rest = d["message"].partition(" ")
            name = rest.split(":")[0]
            if verb == "load":
                assert name not in loading, f"{name} loaded twice at once"
                loading.add(name)
            elif verb in ("ready", "failed", "lost"):
                loading.discard(name)

    asyncio.run(run())
