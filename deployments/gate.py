"""Admission in the model replica, as the engine sees it: every engine request passes here.

The replica opens a `RequestScope` around each client request (a context variable, so the
engine's serving code needs no extra argument) and the engine calls `ReplicaGate.generation`
with the prompt as it will really run (counted once, by the engine's own renderer) before it
submits. Here, in one place: the model's output cap, the KV reservation (and the bounded queue
behind it), the start of the generation timeout, and the usage tally that comes back to the
ingress.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from deployments.kv_admission import KvAdmission
from serve_app.config import ModelLimits
from serve_app.errors import GenerationTimeout, RoundhouseError
from serve_app.protocol import Usage


@dataclass
class RequestScope:
    """One client request in the replica: its limits, what went wrong, what it used."""

    request_id: str
    limits: ModelLimits
    on_timeout: Callable[[], None] | None = None
    error: RoundhouseError | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    admitted: asyncio.Event = field(default_factory=asyncio.Event)
    _timer: asyncio.TimerHandle | None = None

    def fail(self, error: RoundhouseError) -> None:
        if self.error is None:
            self.error = error

    def start_clock(self, model: str) -> None:
        """The generation timeout runs from the first admission, not from the queue."""
        self.admitted.set()
        timeout_s = self.limits.request_timeout_s
        if self._timer is not None or timeout_s is None:
            return

        def expire() -> None:
            self.fail(GenerationTimeout(
                f"model {model}: generation took longer than {timeout_s:g} s and was "
                "stopped; lower max_tokens or retry"))
            if self.on_timeout is not None:
                self.on_timeout()

        self._timer = asyncio.get_running_loop().call_later(timeout_s, expire)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens)


_SCOPE: contextvars.ContextVar[RequestScope | None] = contextvars.ContextVar(
    "roundhouse_request", default=None)


def scoped_context(scope: RequestScope) -> contextvars.Context:
    """A copy of the current context in which `scope` is the current request."""
    context = contextvars.copy_context()
    context.run(_SCOPE.set, scope)
    return context


class _Generation:
    def __init__(self, max_tokens: int, scope: RequestScope | None) -> None:
        self.max_tokens = max_tokens
        self._scope = scope
        self._counts: dict[int, int] = {}

    def produced(self, index: int, tokens: int, cumulative: bool) -> None:
        before = self._counts.get(index, 0)
        now = tokens if cumulative else before + tokens
        self._counts[index] = now
        if self._scope is not None:
            self._scope.completion_tokens += now - before


class ReplicaGate:
    """The `Gate` the replica gives its engine (deployments/engine.py)."""

    def __init__(self, model: str, admission: Callable[[], KvAdmission | None],
                 limits: Callable[[], ModelLimits]) -> None:
        self._model = model
        self._admission = admission
        self._limits = limits

    @contextlib.asynccontextmanager
    async def generation(self, request_id: str, prompt_tokens: int, max_tokens: int,
                         n: int) -> AsyncIterator[_Generation]:
        scope = _SCOPE.get()
        limits = scope.limits if scope is not None else self._limits()
        cap = limits.max_output_tokens
        if cap is not None:
            # Requests asking above the cap were refused (or are clamped) by the replica
            # before the engine saw them; what is left is the default and the clamp.
            max_tokens = min(max_tokens, cap)
        admission = self._admission()
        try:
            if admission is None:
                reservation: contextlib.AbstractAsyncContextManager[None] = (
                    contextlib.nullcontext())
            else:
                reservation = admission.reserve(request_id, prompt_tokens + n * max_tokens)
            async with reservation:
                if scope is not None:
                    scope.prompt_tokens += prompt_tokens
                    scope.start_clock(self._model)
                yield _Generation(max_tokens, scope)
        except RoundhouseError as exc:
            if scope is not None:
                scope.fail(exc)
            raise
