"""KV-cache admission: reserve prompt + max_tokens per request against a model's KV budget.

Pure bookkeeping (no Ray, no vLLM). One long-output request can take a large share of a shared
KV cache; reserving its worst case up front, and queueing what does not fit, keeps it from
starving everyone else. The queue is FIFO with a bounded bypass: a later request that fits may
overtake a waiting one that does not, but only `max_bypass` times, after which the head blocks
the line until it fits, so a long request cannot be passed over forever by short ones.
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
    def __init__(self, capacity_tokens: int, max_bypass: int = 8) -> None:
        if capacity_tokens <= 0:
            raise ValueError("capacity_tokens must be positive")
        self.capacity_tokens = capacity_tokens
        self.max_bypass = max_bypass
        self._held: dict[str, int] = {}
        self._waiting: OrderedDict[str, _Waiter] = OrderedDict()

    @property
    def reserved_tokens(self) -> int:
        return sum(self._held.values())

    @property
    def available_tokens(self) -> int:
        return self.capacity_tokens - self.reserved_tokens

    @property
    def waiting(self) -> tuple[str, ...]:
        return tuple(self._waiting)

    def holds(self, request_id: str) -> bool:
        return request_id in self._held

    def request(self, request_id: str, tokens: int) -> bool:
        """Reserve now if the queue allows it, else enqueue; True when admitted."""
        return request_id in self.enqueue(request_id, tokens)

    def enqueue(self, request_id: str, tokens: int) -> list[str]:
        """Queue a request and admit what fits; returns every id admitted by this call."""
        if tokens > self.capacity_tokens:
            raise AdmissionError(
                f"the request needs {tokens} KV tokens (prompt + max_tokens) but the model's "
                f"KV budget is {self.capacity_tokens} tokens; lower max_tokens")
        if request_id in self._held or request_id in self._waiting:
            raise ValueError(f"request {request_id!r} is already known")
        self._waiting[request_id] = _Waiter(tokens)
        return self.admit_waiting()

    def admit_waiting(self) -> list[str]:
        """Admit queued requests in order (with bounded bypass); returns the admitted ids."""
        admitted: list[str] = []
        oldest_blocked: _Waiter | None = None
        for request_id, waiter in list(self._waiting.items()):
            if oldest_blocked is not None and oldest_blocked.bypassed >= self.max_bypass:
                break  # the oldest waiter has been passed over enough: nobody else goes first
            if waiter.tokens <= self.available_tokens:
                del self._waiting[request_id]
                self._held[request_id] = waiter.tokens
                admitted.append(request_id)
                if oldest_blocked is not None:
                    oldest_blocked.bypassed += 1
            elif oldest_blocked is None:
                oldest_blocked = waiter
        return admitted

    def release(self, request_id: str) -> list[str]:
        """Free a finished, aborted or abandoned request (idempotent); returns newly admitted."""
        self._waiting.pop(request_id, None)
        if self._held.pop(request_id, None) is None:
            return []
        return self.admit_waiting()
