"""KV-cache admission: reserve prompt + max_tokens per request against a model's KV budget.

Pure bookkeeping (no Ray, no vLLM). One long-output request can take a large share of a shared
KV cache; reserving its worst case up front, and queueing what does not fit, keeps it from
starving everyone else.

Two lanes, first come first served within each:
- *large* requests (reserving more than `large_tokens`) may together hold at most
  `large_share` of the budget (one of them is always allowed, however large), so the rest is
  always there for ordinary requests: long outputs cannot push short ones out of the cache;
- *small* requests may use whatever the large ones do not hold, so the budget is not idle when
  few large requests come.
Fairness: small requests may overtake the first large one while it does not fit, but once its
lane has room for it, only `max_bypass` times; then small requests wait until enough of the
running ones finish for it to fit, so a long request cannot be passed over forever. Within a
lane nothing overtakes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


class AdmissionError(ValueError):
    """A request can never be admitted (it is larger than the whole budget)."""


@dataclass
class _Waiter:
    tokens: int
    bypassed: int = 0


class KvLedger:
    def __init__(self, capacity_tokens: int, max_bypass: int = 16,
                 large_tokens: int | None = None, large_share: float = 1.0) -> None:
        self.max_bypass = max_bypass
        self.resize(capacity_tokens, large_tokens, large_share)
        self._held: dict[str, tuple[int, bool]] = {}
        self._reserved = 0
        self._large_reserved = 0
        self._small: OrderedDict[str, _Waiter] = OrderedDict()
        self._large: OrderedDict[str, _Waiter] = OrderedDict()

    def resize(self, capacity_tokens: int, large_tokens: int | None = None,
               large_share: float = 1.0) -> None:
        """New sizes; what is held stays held (over a smaller budget, nothing new is admitted
        until enough is released). Call admit_waiting() after a resize."""
        if capacity_tokens <= 0:
            raise ValueError("capacity_tokens must be positive")
        if not 0 < large_share <= 1:
            raise ValueError("large_share must be in (0, 1]")
        self.capacity_tokens = capacity_tokens
        # None: one lane, every request is small.
        self.large_tokens = large_tokens
        self.large_cap_tokens = int(capacity_tokens * large_share)

    @property
    def reserved_tokens(self) -> int:
        return self._reserved

    @property
    def large_reserved_tokens(self) -> int:
        return self._large_reserved

    @property
    def available_tokens(self) -> int:
        return self.capacity_tokens - self._reserved

    @property
    def waiting(self) -> tuple[str, ...]:
        return (*self._large, *self._small)

    def holds(self, request_id: str) -> bool:
        return request_id in self._held

    def is_large(self, tokens: int) -> bool:
        return self.large_tokens is not None and tokens > self.large_tokens

    def request(self, request_id: str, tokens: int) -> bool:
        """Reserve now if the queue allows it, else enqueue; True when admitted."""
        return request_id in self.enqueue(request_id, tokens)

    def enqueue(self, request_id: str, tokens: int) -> list[str]:
        """Queue a request and admit what fits; returns every id admitted by this call."""
        if tokens > self.capacity_tokens:
            raise AdmissionError(
                f"the request needs {tokens} KV tokens (prompt + max_tokens) but the model's "
                f"KV budget is {self.capacity_tokens} tokens; lower max_tokens")
        if request_id in self._held or request_id in self._small or request_id in self._large:
            raise ValueError(f"request {request_id!r} is already known")
        lane = self._large if self.is_large(tokens) else self._small
        lane[request_id] = _Waiter(tokens)
        return self.admit_waiting()

    def admit_waiting(self) -> list[str]:
        """Admit queued requests in lane order; returns the admitted ids."""
        admitted: list[str] = []
        while (request_id := self._next()) is not None:
            admitted.append(request_id)
        return admitted

    def _next(self) -> str | None:
        head: _Waiter | None = None
        lane_has_room = False
        if self._large:
            request_id, head = next(iter(self._large.items()))
            lane_has_room = (self._large_reserved == 0
                             or self._large_reserved + head.tokens <= self.large_cap_tokens)
            if lane_has_room and head.tokens <= self.available_tokens:
                return self._admit(self._large, request_id, large=True)
            if lane_has_room and head.bypassed >= self.max_bypass:
                return None  # passed over enough: small requests wait until it fits
        if self._small:
            request_id, waiter = next(iter(self._small.items()))
            if waiter.tokens <= self.available_tokens:
                if head is not None and lane_has_room:
                    head.bypassed += 1
                return self._admit(self._small, request_id, large=False)
        return None

    def _admit(self, lane: OrderedDict[str, _Waiter], request_id: str, large: bool) -> str:
        tokens = lane.pop(request_id).tokens
        self._held[request_id] = (tokens, large)
        self._reserved += tokens
        if large:
            self._large_reserved += tokens
        return request_id

    def release(self, request_id: str) -> list[str]:
        """Free a finished, aborted or abandoned request (idempotent); returns newly admitted."""
        waiting = self._small.pop(request_id, None) or self._large.pop(request_id, None)
        held = self._held.pop(request_id, None)
        if held is None:
            # A waiter leaving can unblock the ones behind it (it may have been a lane's head).
            return self.admit_waiting() if waiting is not None else []
        tokens, large = held
        self._reserved -= tokens
        if large:
            self._large_reserved -= tokens
        return self.admit_waiting()
