"""What crosses Ray between the ingress and a model replica (plain dataclasses, no HTTP).

The ingress forwards the client's JSON body (with `model` set to the served model's name) to
the replica, which answers through the engine's own OpenAI server app. The request's schema and
every field's validation are the engine's (vLLM's), not ours.

No `slots=True`: Ray pickles every item of a stream, and a dataclass with a `__dict__` pickles
faster (~4 us against ~6 us per round trip here; the replica's profile showed the slots
dataclasses' `__getstate__` at ~5% of its samples under streaming load).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serve_app.config import ModelLimits


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class ForwardedRequest:
    """One client request as a model replica gets it."""

    path: str  # e.g. "/v1/chat/completions"; the engine app's route
    body: dict[str, Any]  # the client's JSON body, `model` renamed to the served model
    request_id: str
    # The model's current limits (live config updates reach the replica with its requests).
    limits: ModelLimits | None = None


@dataclass(frozen=True)
class Reply:
    """A whole response (the replica's `call`)."""

    status: int
    media_type: str
    body: bytes
    usage: Usage


@dataclass(frozen=True)
class StreamHead:
    """First item of a replica stream: sent once the request was admitted and produced its
    first bytes, so a refusal before that is a real HTTP status."""

    status: int
    media_type: str
    body: bytes


@dataclass(frozen=True)
class StreamEnd:
    """Last item of every replica stream: the last bytes and the usage (for accounting)."""

    body: bytes
    usage: Usage


def model_card(name: str, created: int, root: str | None = None,
               max_model_len: int | None = None) -> dict[str, Any]:
    card: dict[str, Any] = {"id": name, "object": "model", "created": created,
                            "owned_by": "roundhouse", "root": root or name, "parent": None}
    if max_model_len is not None:
        card["max_model_len"] = max_model_len
    return card
