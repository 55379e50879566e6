"""A deterministic engine for lifecycle tests: the Engine interface (deployments/engine.py) with
a minimal OpenAI server app of its own, no model, configurable timings.

Prompt "tokens" are whitespace-separated words; the output is a fixed word sequence chosen by a
hash of the prompt, so two runs give the same text. Its timings come from the model's
`engine_kwargs` (the keys of `FakeSettings`), so tests configure it as they would vLLM.
Errors use vLLM's bodies (integer `code`, `BadRequestError`) so the replica's mapping of engine
errors is exercised too. Deploy it with `tests.fake_engine:build_app` as the import path.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from deployments.asgi import AsgiApp
from deployments.engine import EngineError, Gate
from serve_app.config import ModelConfig

_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
          "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa")
DEFAULT_OUTPUT_TOKENS = 16


class FakeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    load_s: float = Field(0.0, ge=0)
    ttft_s: float = Field(0.0, ge=0)
    tokens_per_s: float = Field(500.0, gt=0)
    max_model_len: int = Field(2048, ge=16)
    kv_capacity_tokens: int = Field(65536, ge=16)
    fail_load: str | None = None  # start() raises with this message


def count_tokens(text: str) -> int:
    return len(text.split())


def _error(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    kind = "BadRequestError" if status == 400 else "InternalServerError"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": status}}, status)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


class FakeEngine:
    def __init__(self, config: ModelConfig) -> None:
        self._name = config.name
        self._settings = FakeSettings.model_validate(config.engine_kwargs)
        self._gate: Gate | None = None
        self._started = False
        self._closed = False
        self._active: set[str] = set()
        self._app = Starlette(routes=[
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/completions", self._completions, methods=["POST"]),
            Route("/tokenize", self._tokenize, methods=["POST"]),
            Route("/version", self._version, methods=["GET"]),
        ])

    @classmethod
    def config_problems(cls, config: ModelConfig) -> list[str]:
        try:
            FakeSettings.model_validate(config.engine_kwargs)
        except ValidationError as exc:
            return [f"fake engine_kwargs: {exc.errors()[0]['msg']}"]
        return []

    @property
    def app(self) -> AsgiApp:
        return self._app

    @property
    def max_model_len(self) -> int:
        return self._settings.max_model_len

    async def start(self, gate: Gate) -> None:
        if self._settings.load_s:
            await asyncio.sleep(self._settings.load_s)  # simulated weight loading
        if self._settings.fail_load:
            raise EngineError(self._settings.fail_load)
        self._gate = gate
        self._started = True

    def num_unfinished(self) -> int:
        return len(self._active)

    async def check_health(self) -> None:
        if not self._started or self._closed:
            raise EngineError("fake engine is not running")

    async def kv_capacity_tokens(self) -> int:
        return self._settings.kv_capacity_tokens

    async def shutdown(self) -> None:
        self._closed = True

    # --- the OpenAI app ---------------------------------------------------------------------

    async def _body(self, request: Request) -> dict[str, Any] | Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error("invalid JSON")
        if not isinstance(body, dict):
            return _error("the body must be an object")
        if body.get("model") not in (None, self._name):
            return _error(f"The model `{body.get('model')}` does not exist.", 404)
        for key, low, high in (("temperature", 0, 2), ("top_p", 1e-9, 1)):
            value = body.get(key)
            if value is not None and not (isinstance(value, int | float) and low <= value <= high):
                return _error(f"{key} must be in [{low}, {high}], got {value}.", param=key)
        for key in ("max_tokens", "max_completion_tokens", "n"):
            value = body.get(key)
            if value is not None and (not isinstance(value, int) or value < 1):
                return _error(f"{key} must be at least 1, got {value}.", param=key)
        return body

    async def _chat(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error("messages: Field required", param="messages")
        text = "\n".join(_text(m.get("content")) for m in messages if isinstance(m, dict))
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        return await self._respond(body, [text], limit, chat=True)

    async def _completions(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(
                isinstance(p, str) for p in prompts):
            return _error("prompt: Field required", param="prompt")
        return await self._respond(body, prompts, body.get("max_tokens", 16), chat=False)

    async def _tokenize(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        words = str(body.get("prompt", "")).split()
        return JSONResponse({"count": len(words), "max_model_len": self.max_model_len,
                             "tokens": [len(w) for w in words]})

    async def _version(self, request: Request) -> Response:
        return JSONResponse({"version": "fake"})

    async def _respond(self, body: dict[str, Any], prompts: list[str], limit: int | None,
                       chat: bool) -> Response:
        n = int(body.get("n") or 1)
        for text in prompts:
            if count_tokens(text) > self.max_model_len:
                return _error(f"This model's maximum context length is {self.max_model_len} "
                              f"tokens. However, your prompt contains {count_tokens(text)} "
                              "input tokens, which exceeds this limit even without any output "
                              "tokens. Please reduce the length of the input prompt.",
                              param="input_tokens")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else list(stops)
        events = self._events(prompts, limit, n, int(body.get("seed") or 0), stops)
        if body.get("stream") is True:
            options = body.get("stream_options") or {}
            return StreamingResponse(
                self._sse(events, rid, created, chat, bool(options.get("include_usage"))),
                media_type="text/event-stream")
        texts: dict[int, list[str]] = {}
        reasons: dict[int, str | None] = {}
        prompt_tokens = completion_tokens = 0
        async for index, piece, reason, used in events:
            texts.setdefault(index, []).append(piece)
            completion_tokens += 1 if piece else 0
            if reason is not None:
                reasons[index] = reason
            prompt_tokens = used
        choices = []
        for i in range(n * len(prompts)):
            text = "".join(texts.get(i, []))
            choice: dict[str, Any] = {"index": i, "logprobs": None,
                                      "finish_reason": reasons.get(i)}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return JSONResponse({"id": rid, "object": "chat.completion" if chat
                             else "text_completion", "created": created,
                             "model": self._name, "choices": choices, "usage": usage})

    async def _events(self, prompts: list[str], limit: int | None, n: int, seed: int,
                      stops: list[str]) -> AsyncIterator[tuple[int, str, str | None, int]]:
        """(choice index, text, finish reason, prompt tokens so far) per generated token;
        each prompt is one engine request that goes through the gate."""
        assert self._gate is not None
        prompt_total = 0
        for p, text in enumerate(prompts):
            prompt_tokens = max(1, count_tokens(text))
            room = self.max_model_len - prompt_tokens
            asked = min(limit, room) if limit is not None else min(DEFAULT_OUTPUT_TOKENS, room)
            request_id = uuid.uuid4().hex
            async with self._gate.generation(request_id, prompt_tokens, asked, n) as gen:
                prompt_total += prompt_tokens
                steps = max(1, gen.max_tokens)
                digest = hashlib.sha256(f"{text}|{seed}".encode()).digest()
                self._active.add(request_id)
                try:
                    if self._settings.ttft_s:
                        await asyncio.sleep(self._settings.ttft_s)  # simulated prefill
                    produced = [""] * n
                    done = [False] * n
                    for step in range(steps):
                        for index in range(n):
                            if done[index]:
                                continue
                            word = _WORDS[(digest[(step + index) % len(digest)] + step)
                                          % len(_WORDS)]
                            piece = word if step == 0 else f" {word}"
                            produced[index] += piece
                            reason: str | None = None
                            if any(s in produced[index] for s in stops):
                                reason, piece = "stop", ""
                            elif step == steps - 1:
                                reason = "length" if limit is not None else "stop"
                            done[index] = reason is not None
                            gen.produced(index, 1 if piece else 0, cumulative=False)
                            yield p * n + index, piece, reason, prompt_total
                        if all(done):
                            break
                        await asyncio.sleep(1.0 / self._settings.tokens_per_s)  # decode step
                finally:
                    self._active.discard(request_id)

    async def _sse(self, events: AsyncIterator[tuple[int, str, str | None, int]], rid: str,
                   created: int, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        started: set[int] = set()
        prompt_tokens = completion_tokens = 0
        try:
            async for index, piece, reason, used in events:
                prompt_tokens = used
                completion_tokens += 1 if piece else 0
                if chat:
                    delta: dict[str, Any] = {"content": piece}
                    if index not in started:
                        started.add(index)
                        delta["role"] = "assistant"
                    choice: dict[str, Any] = {"index": index, "delta": delta}
                else:
                    choice = {"index": index, "text": piece}
                choice.update({"logprobs": None, "finish_reason": reason})
                yield "data: " + json.dumps({"id": rid, "object": kind, "created": created,
                                             "model": self._name, "choices": [choice]}) + "\n\n"
        except Exception as exc:  # reported in-band, as vLLM's generators do
            yield "data: " + json.dumps({"error": {"message": str(exc), "type":
                                                   "InternalServerError", "param": None,
                                                   "code": 500}}) + "\n\n"
        else:
            if include_usage:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}
                yield "data: " + json.dumps({"id": rid, "object": kind, "created": created,
                                             "model": self._name, "choices": [],
                                             "usage": usage}) + "\n\n"
        yield "data: [DONE]\n\n"


def build_app(args: dict[str, Any]) -> Any:
    """The Roundhouse app with the fake engine behind every model (the tests' import path)."""
    from serve_app.app import build

    return build(args, engine_factory=FakeEngine)
