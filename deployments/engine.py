"""The contract between a model replica and whatever generates tokens.

An engine serves OpenAI requests through an ASGI app of its own (for vLLM: the app of vLLM's
OpenAI server, on vLLM's serving objects), so every field and behaviour the engine's server has,
Roundhouse has. Before each generation reaches the engine, the engine asks the replica's `Gate`
for room: admission (output cap, KV reservation, queue, timeouts) lives in one place, the
replica, and engines only report what they are about to run.

`ModelServer` takes the engine class as an argument (as Ray Serve LLM's `LLMServer` takes
`engine_cls`): `VllmEngine` in production, a fake engine with the same interface in the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, runtime_checkable

from deployments.asgi import AsgiApp
from serve_app.config import ModelConfig


class EngineError(Exception):
    """The engine cannot serve (failed to start, died); the message names the cause."""


class Generation(Protocol):
    """One admitted engine request: its output limit after the model's cap, and where the
    engine reports what it produced (for usage and the tokens-per-minute charge)."""

    max_tokens: int

    def produced(self, index: int, tokens: int, cumulative: bool) -> None:
        """`tokens` new tokens for choice `index` (or, if `cumulative`, its total so far)."""


class Gate(Protocol):
    def generation(self, request_id: str, prompt_tokens: int, max_tokens: int,
                   n: int) -> AbstractAsyncContextManager[Generation]:
        """Admits one engine request (raising an OpenAI error when it cannot be served) and
        holds its KV reservation for the body of the `async with`."""


@runtime_checkable
class Engine(Protocol):
    @property
    def app(self) -> AsgiApp:
        """The engine's OpenAI server app (after start)."""

    @property
    def max_model_len(self) -> int: ...

    async def start(self, gate: Gate) -> None:
        """Load weights, allocate the KV cache, build the app; raise EngineError if that fails.
        Every generation the app runs goes through `gate.generation` first."""

    def num_unfinished(self) -> int:
        """Requests the engine is still working on (a cancelled one must drop out)."""

    async def check_health(self) -> None:
        """Raise EngineError if the engine can no longer serve."""

    async def kv_capacity_tokens(self) -> int:
        """How many tokens of KV cache the engine holds in total (blocks x block size)."""

    async def shutdown(self) -> None:
        """Free the engine's memory and stop its processes; safe to call twice."""


# Builds an engine for a model's (merged) config; a class or a picklable callable.
EngineFactory = Callable[[ModelConfig], Engine]


def config_problems(factory: Any, model: ModelConfig) -> list[str]:
    """What the engine class finds wrong with a model's settings (checked at deploy time);
    engines without a `config_problems` classmethod accept everything."""
    check = getattr(factory, "config_problems", None)
    return list(check(model)) if check is not None else []
