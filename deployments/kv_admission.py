"""The model replica's admission gate: each request reserves its worst-case KV tokens before it
reaches the engine, and waits (bounded in number and time) while they do not fit.

The bookkeeping is the pure `KvLedger` (serve_app/policy/admission.py); this adds the waiting.
The gate lives in the replica, next to the engine whose KV cache it guards, so the budget is
exact whatever the number of ingress replicas. Fairness and the large-request lane: see the
ledger's docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable

from serve_app.config import ModelLimits
from serve_app.errors import BadRequest, RateLimited
from serve_app.policy.admission import AdmissionError, KvLedger

RETRY_AFTER_S = 2.0
# Without limits.large_request_tokens, a request reserving over 1/16 of the budget is large.
LARGE_DIVISOR = 16


class KvAdmission:
    def __init__(self, model: str, capacity_tokens: int, limits: ModelLimits,
                 max_bypass: int = 16,
                 on_change: Callable[[dict[str, int]], None] | None = None) -> None:
        self._model = model
        self._on_change = on_change
        self._limits = limits
        # An engine that cannot say its KV capacity gets no gate (the engine queues on its own).
        self._enabled = capacity_tokens > 0 and limits.admission
        self._capacity = capacity_tokens
        budget, large = self._sizes(limits)
        self._ledger = KvLedger(budget, max_bypass=max_bypass, large_tokens=large,
                                large_share=limits.large_request_share)
        self._admitted: dict[str, asyncio.Event] = {}

    def _sizes(self, limits: ModelLimits) -> tuple[int, int]:
        budget = max(1, int(self._capacity * limits.kv_budget_fraction))
        return budget, limits.large_request_tokens or max(1, budget // LARGE_DIVISOR)

    def update(self, limits: ModelLimits, capacity_tokens: int | None = None) -> None:
        """New limits (a live config update) or a new KV capacity (the engine was restarted
        with other settings) on a running replica. Reservations held stay; a smaller budget
        admits nothing new until enough of them are released."""
        if capacity_tokens is not None:
            self._capacity = capacity_tokens
        self._limits = limits
        self._enabled = self._capacity > 0 and limits.admission
        budget, large = self._sizes(limits)
        self._ledger.resize(budget, large, limits.large_request_share)
        self._wake(self._ledger.admit_waiting())
        self._changed()

    @property
    def budget_tokens(self) -> int:
        return self._ledger.capacity_tokens

    def stats(self) -> dict[str, int]:
        return {"kv_budget_tokens": self._ledger.capacity_tokens,
                "kv_reserved_tokens": self._ledger.reserved_tokens,
                "kv_reserved_large_tokens": self._ledger.large_reserved_tokens,
                "queued_requests": len(self._ledger.waiting)}

    @contextlib.asynccontextmanager
    async def reserve(self, key: str, tokens: int) -> AsyncIterator[None]:
        """Holds `tokens` of the KV budget for the body of the `async with`; released however
        it ends (completion, error, timeout, cancellation by a client disconnect)."""
        if not self._enabled:
            yield
            return
        await self._acquire(key, tokens)
        try:
            yield
        finally:
            self._release(key)

    async def _acquire(self, key: str, tokens: int) -> None:
        try:
            admitted = self._ledger.enqueue(key, tokens)
        except AdmissionError as exc:
            raise BadRequest(f"model {self._model}: {exc}", param="max_tokens") from None
        self._wake(a for a in admitted if a != key)
        self._changed()
        if key in admitted:
            return
        waiting = len(self._ledger.waiting)
        if waiting > self._limits.max_queued_requests:
            self._release(key)
            raise RateLimited(
                f"model {self._model} is at its KV cache budget and "
                f"{waiting - 1} requests are already waiting; retry later",
                code="queue_full", retry_after_s=RETRY_AFTER_S)
        event = self._admitted[key] = asyncio.Event()
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation
            # (a client gone) that arrives as the event is set.
            async with asyncio.timeout(self._limits.queue_timeout_s):
                await event.wait()
        except TimeoutError:
            self._release(key)
            raise RateLimited(
                f"model {self._model} had no KV cache room for this request within "
                f"{self._limits.queue_timeout_s:g} s; retry later",
                code="queue_timeout", retry_after_s=RETRY_AFTER_S) from None
        except BaseException:
            self._release(key)
            raise

    def _release(self, key: str) -> None:
        self._admitted.pop(key, None)
        self._wake(self._ledger.release(key))
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.stats())

    def _wake(self, keys: Iterable[str]) -> None:
        for key in keys:
            event = self._admitted.pop(key, None)
            if event is not None:
                event.set()
