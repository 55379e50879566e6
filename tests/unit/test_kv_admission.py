"""deployments/kv_admission.py: the replica's gate over the KV ledger."""

from __future__ import annotations

import asyncio

import pytest

from deployments.kv_admission import KvAdmission
from serve_app.config import ModelLimits
from serve_app.errors import BadRequest, RateLimited


async def test_waits_for_room_and_releases_on_exit() -> None:
    gate = KvAdmission("m", 100, ModelLimits(max_queued_requests=1, queue_timeout_s=5,
                                             large_request_share=1.0))
    entered = {key: asyncio.Event() for key in "ab"}
    release = {key: asyncio.Event() for key in "ab"}

    async def run(key: str) -> None:
        async with gate.reserve(key, 60):
            entered[key].set()
            await release[key].wait()

    a = asyncio.create_task(run("a"))
    await asyncio.wait_for(entered["a"].wait(), 5)
    b = asyncio.create_task(run("b"))
    await asyncio.sleep(0)  # one turn of the loop: b runs its first step and enqueues
    assert gate.stats()["queued_requests"] == 1 and not entered["b"].is_set()
    with pytest.raises(RateLimited, match="already waiting"):
        async with gate.reserve("c", 60):
            pass
    release["a"].set()
    await a
    await asyncio.wait_for(entered["b"].wait(), 5)
    assert gate.stats()["kv_reserved_tokens"] == 60
    release["b"].set()
    await b
    assert gate.stats() == {"kv_budget_tokens": 100, "kv_reserved_tokens": 0,
                            "kv_reserved_large_tokens": 0, "queued_requests": 0}


async def test_cancelled_waiter_leaves_no_trace_and_timeouts_are_429() -> None:
    gate = KvAdmission("m", 100, ModelLimits(queue_timeout_s=0.05, kv_budget_fraction=0.5))
    assert gate.budget_tokens == 50
    with pytest.raises(BadRequest, match="KV budget is 50 tokens"):
        async with gate.reserve("big", 51):
            pass
    async with gate.reserve("a", 50):
        waiter = asyncio.create_task(gate.reserve("b", 10).__aenter__())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        with pytest.raises(RateLimited, match="within 0.05 s"):
            async with gate.reserve("c", 10):
                pass
    assert gate.stats()["kv_reserved_tokens"] == 0 and gate.stats()["queued_requests"] == 0


async def test_admission_off_or_unknown_capacity_lets_everything_through() -> None:
    for gate in (KvAdmission("m", 100, ModelLimits(admission=False)),
                 KvAdmission("m", 0, ModelLimits())):
        async with gate.reserve("a", 10_000), gate.reserve("b", 10_000):
            assert gate.stats()["kv_reserved_tokens"] == 0
