"""The contract between a model replica and whatever generates tokens.

`ModelServer` only talks to this protocol, so the real vLLM engine and the deterministic fake
engine used by lifecycle tests are interchangeable per model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from serve_app.protocol import Sampling


@dataclass(frozen=True)
class EngineRequest:
    request_id: str  # unique per engine request (not the client's x-request-id)
    sampling: Sampling
    prompt: str | None = None  # completions
    messages: tuple[dict[str, str], ...] = ()  # chat: the engine applies its chat template


@dataclass(frozen=True)
class EngineOutput:
    """New text for one choice since the previous output (a delta, never cumulative)."""

    index: int
    text: str
    num_tokens: int  # tokens generated for this choice in this delta
    prompt_tokens: int
    finish_reason: str | None = None  # "stop" | "length" | "abort" once the choice is done


class EngineError(Exception):
    """The engine cannot serve (failed to start, died); the message names the cause."""


class InvalidRequest(ValueError):
    """The engine refuses the request's parameters (a client error, not an engine failure)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLong(ValueError):
    def __init__(self, prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
        wanted = prompt_tokens + (max_tokens or 0)
        what = f"{prompt_tokens} prompt tokens"
        if max_tokens:
            what += f" + {max_tokens} max_tokens = {wanted}"
        super().__init__(
            f"this model's context is {max_model_len} tokens, but the request needs {what}; "
            "shorten the prompt or lower max_tokens"
        )
        self.prompt_tokens = prompt_tokens
        self.max_model_len = max_model_len


@runtime_checkable
class Engine(Protocol):
    @property
    def max_model_len(self) -> int: ...

    async def start(self) -> None:
        """Load weights and allocate the KV cache; raise EngineError if that fails."""

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Stream deltas; raise PromptTooLong before the first output if it cannot fit.

        Cancelling the iteration (client gone) must abort the request in the engine.
        """

    async def abort(self, request_id: str) -> None: ...

    def num_unfinished(self) -> int:
        """Requests the engine is still working on (a cancelled one must drop out)."""

    async def check_health(self) -> None:
        """Raise EngineError if the engine can no longer serve."""

    async def kv_capacity_tokens(self) -> int:
        """How many tokens of KV cache the engine holds in total (blocks x block size)."""

    async def shutdown(self) -> None:
        """Free the engine's memory and stop its processes; safe to call twice."""
