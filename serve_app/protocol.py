"""OpenAI request models (validated in the ingress) and the response shapes we send back.

Unknown request fields are ignored, as OpenAI-compatible servers (vLLM included) do, so that
newer clients keep working; known fields we cannot honour are refused with a 400 that names
them, so nobody silently gets something other than they asked for.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serve_app.config import ModelLimits

MAX_STOP_SEQUENCES = 16
MAX_N = 16


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class StreamOptions(_Request):
    include_usage: bool = False


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _SamplingFields(_Request):
    model: str = "auto"
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    user: str | None = None
    # Free-form; Roundhouse reads `quality` ("high" | "standard") from it for routing.
    metadata: dict[str, Any] | None = None
    # vLLM extensions, accepted as vLLM's own OpenAI server accepts them.
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=2)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list):
            if len(value) > MAX_STOP_SEQUENCES:
                raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
            if any(s == "" for s in value):
                raise ValueError("stop sequences must not be empty")
        return value

    @model_validator(mode="after")
    def _check_stream_options(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_unsupported(self) -> ChatCompletionRequest:
        if self.logprobs:
            raise ValueError("logprobs is not supported by this server")
        if self.tools:
            raise ValueError("tools are not supported by this server")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError("only response_format {'type': 'text'} is supported")
        return self

    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=64)]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _check_unsupported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.logprobs is not None:
            raise ValueError("logprobs is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported by this server")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def output_limit(self) -> int | None:
        return self.max_tokens


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """A one-line message and the offending parameter of a request validation error."""
    first = exc.errors(include_url=False)[0]
    loc = [str(p) for p in first.get("loc", ()) if not str(p).startswith(("function-", "str",
                                                                          "list["))]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


# --- what the ingress hands a model replica -------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """Engine-neutral sampling parameters; each engine maps them to its own type."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerateCall:
    """One client request as a model replica sees it: no HTTP, no pydantic."""

    endpoint: Literal["chat", "completions"]
    model: str
    request_id: str
    sampling: Sampling
    messages: tuple[dict[str, str], ...] = ()
    prompts: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    # Prompt tokens per prompt (chat: one), counted by the ingress with the model's tokenizer;
    # empty when not counted. The replica reserves KV cache from them.
    prompt_tokens: tuple[int, ...] = ()
    # The model's current limits (live config updates reach the replica with its requests).
    limits: ModelLimits | None = None

    def worst_case_tokens(self, context: int | None) -> int:
        """Each prompt plus n x its output limit (the rest of the context when max_tokens is
        not set): what the request may hold in the KV cache, and what a tokens-per-minute limit
        charges up front. A prompt not counted is taken as the whole context."""
        total = 0
        for i in range(max(1, len(self.prompts))):
            prompt = self.prompt_tokens[i] if i < len(self.prompt_tokens) else (context or 0)
            if context is not None:
                prompt = min(prompt, context)
            output = self.sampling.max_tokens or max(0, (context or prompt) - prompt)
            total += prompt + self.sampling.n * output
        return total


def sampling_from(req: ChatCompletionRequest | CompletionRequest) -> Sampling:
    return Sampling(
        max_tokens=req.output_limit(),
        temperature=req.temperature,
        top_p=req.top_p,
        n=req.n,
        stop=tuple(req.stop_list()),
        seed=req.seed,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        top_k=req.top_k,
        min_p=req.min_p,
        repetition_penalty=req.repetition_penalty,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
    )


def call_from_chat(req: ChatCompletionRequest, model: str, request_id: str) -> GenerateCall:
    messages = tuple({"role": m.role, "content": m.text()} for m in req.messages)
    return GenerateCall(
        endpoint="chat", model=model, request_id=request_id, sampling=sampling_from(req),
        messages=messages, stream=req.stream, include_usage=req.include_usage,
    )


def call_from_completion(req: CompletionRequest, model: str, request_id: str) -> GenerateCall:
    return GenerateCall(
        endpoint="completions", model=model, request_id=request_id, sampling=sampling_from(req),
        prompts=tuple(req.prompts()), stream=req.stream, include_usage=req.include_usage,
    )


# --- response shapes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass(frozen=True)
class StreamEnd:
    """Last item of every replica stream; the ingress consumes it (usage for accounting)."""

    usage: Usage


def response_id(endpoint: str) -> str:
    prefix = "chatcmpl" if endpoint == "chat" else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex}"


def model_card(name: str, created: int, root: str | None = None) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "roundhouse",
            "root": root or name, "parent": None}


def chat_chunk(
    rid: str, created: int, model: str, index: int, delta: dict[str, str],
    finish_reason: str | None, with_usage_field: bool,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": None,
                     "finish_reason": finish_reason}],
    }
    if with_usage_field:
        chunk["usage"] = None  # as OpenAI sends it when include_usage is on
    return chunk


def completion_chunk(
    rid: str, created: int, model: str, index: int, text: str,
    finish_reason: str | None, with_usage_field: bool,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": index, "text": text, "logprobs": None,
                     "finish_reason": finish_reason}],
    }
    if with_usage_field:
        chunk["usage"] = None
    return chunk


def usage_chunk(rid: str, created: int, model: str, endpoint: str, usage: Usage) -> dict[str, Any]:
    obj = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage.as_dict()}


def full_response(
    rid: str, created: int, model: str, endpoint: str,
    choices: list[tuple[str, str | None]], usage: Usage,
) -> dict[str, Any]:
    if endpoint == "chat":
        body_choices: list[dict[str, Any]] = [
            {"index": i, "message": {"role": "assistant", "content": text},
             "logprobs": None, "finish_reason": reason}
            for i, (text, reason) in enumerate(choices)
        ]
        obj = "chat.completion"
    else:
        body_choices = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
            for i, (text, reason) in enumerate(choices)
        ]
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model,
            "choices": body_choices, "usage": usage.as_dict()}
