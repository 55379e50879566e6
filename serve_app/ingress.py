"""The ingress deployment: parse -> validate -> pick the model -> forward -> stream back.

A plain Starlette request handler (no FastAPI) keeps the hop cheap; the model replicas produce
SSE-ready lines, so streaming here is forwarding strings.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from serve_app.config import AppConfig
from serve_app.errors import (
    BadRequest,
    MethodNotAllowed,
    ModelDraining,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    error_payload,
    unwrap,
)
from serve_app.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateCall,
    StreamEnd,
    call_from_chat,
    call_from_completion,
    model_card,
)
from serve_app.residency_client import ResidencyClient

logger = logging.getLogger("ray.serve.roundhouse")  # Serve's replica log files

_MAX_REQUEST_ID_LEN = 128
_DONE = "data: [DONE]\n\n"

Handler = Callable[[Request, str], Awaitable[Response]]
_Body = TypeVar("_Body", ChatCompletionRequest, CompletionRequest)


def _json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, separators=(",", ":"), ensure_ascii=False), status,
                    headers=headers, media_type="application/json")


def _request_id(request: Request) -> str:
    # Serve's proxy takes the client's x-request-id (or makes one), puts it in the request
    # headers and echoes it on the response; we only reuse it for errors and logs.
    given = request.headers.get("x-request-id", "")
    if 0 < len(given) <= _MAX_REQUEST_ID_LEN and given.isprintable():
        return given
    return uuid.uuid4().hex


# A request the evicted replica turned away goes through the controller again, this often.
_MAX_ATTEMPTS = 3


class Ingress:
    async def __init__(self, config: dict[str, Any], models: dict[str, DeploymentHandle]) -> None:
        self._config = AppConfig.model_validate(config)
        self._residency = ResidencyClient(serve.get_replica_context().app_name, config)
        await self._residency.start()
        self._names = self._config.lookup()
        self._handles = dict(models)
        self._stream_handles = {name: h.options(stream=True) for name, h in models.items()}
        self._max_body = self._config.ingress.max_body_bytes
        self._created = int(time.time())
        self._routes: dict[str, dict[str, Handler]] = {
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/completions": {"POST": self._completions},
            "/v1/models": {"GET": self._models},
            "/health": {"GET": self._health},
        }

    async def __call__(self, request: Request) -> Response:
        request_id = _request_id(request)
        started = time.perf_counter()
        try:
            response = await self._dispatch(request, request_id)
        except Exception as exc:
            status, body, headers = error_payload(exc, request_id)
            response = _json_response(body, status, headers)
        if request.url.path != "/health":
            logger.info("request %s %s %s -> %d in %.1f ms", request_id, request.method,
                        request.url.path, response.status_code,
                        (time.perf_counter() - started) * 1000)
        return response

    async def _dispatch(self, request: Request, request_id: str) -> Response:
        path = request.url.path.rstrip("/") or "/"
        methods = self._routes.get(path)
        if methods is None and path.startswith("/v1/models/"):
            return await self._model(path.removeprefix("/v1/models/"))
        if methods is None:
            raise NotFound(f"no route for {request.method} {path}")
        handler = methods.get(request.method)
        if handler is None:
            raise MethodNotAllowed(f"{request.method} is not allowed on {path}; "
                                   f"use {', '.join(methods)}")
        return await handler(request, request_id)

    # --- request parsing ------------------------------------------------------------------

    async def _read_json(self, request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body:
            raise PayloadTooLarge(f"request body is {declared} bytes; the limit is "
                                  f"{self._max_body} bytes")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > self._max_body:
                    raise PayloadTooLarge(f"request body exceeds the limit of "
                                          f"{self._max_body} bytes")
        except ClientDisconnect:
            raise BadRequest("client disconnected while sending the body") from None
        if not body:
            raise BadRequest("request body is empty; send a JSON object")
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise BadRequest("request body must be a JSON object")
        return parsed

    def _resolve_model(self, requested: str) -> str:
        if requested == "auto":
            return self._config.default
        name = self._names.get(requested)
        if name is None:
            raise ModelNotFound(
                f"the model {requested!r} does not exist; available: "
                f"{', '.join(['auto', *self._names])}", param="model")
        return name

    # --- endpoints ------------------------------------------------------------------------

    async def _parse(self, request: Request, schema: type[_Body]) -> _Body:
        body = await self._read_json(request)
        try:
            return schema.model_validate(body)
        except ValidationError as exc:
            message, param = validation_message(exc)
            raise BadRequest(message, param=param) from None

    async def _chat(self, request: Request, request_id: str) -> Response:
        parsed = await self._parse(request, ChatCompletionRequest)
        model = self._resolve_model(parsed.model)
        return await self._generate(call_from_chat(parsed, model, request_id))

    async def _completions(self, request: Request, request_id: str) -> Response:
        parsed = await self._parse(request, CompletionRequest)
        model = self._resolve_model(parsed.model)
        return await self._generate(call_from_completion(parsed, model, request_id))

    async def _generate(self, call: GenerateCall) -> Response:
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            # Loads the model first if it is cold (waiting, bounded) or refuses with a 503.
            await self._residency.ready(call.model)
            try:
                return await self._forward(call)
            except Exception as exc:
                if not isinstance(unwrap(exc), ModelDraining) or attempt == _MAX_ATTEMPTS:
                    raise
                self._residency.invalidate(call.model)
        raise AssertionError("unreachable")

    async def _forward(self, call: GenerateCall) -> Response:
        headers = {"x-roundhouse-model": call.model}
        if not call.stream:
            with self._residency.busy(call.model):
                result = await self._handles[call.model].complete.remote(call)
            return _json_response(result, headers=headers)
        stream: DeploymentResponseGenerator = self._stream_handles[call.model].stream.remote(call)
        try:
            # Wait for the first item before answering 200, so a request the model rejects
            # (prompt too long, model failed) still gets a proper status code.
            first = await stream.__anext__()
        except BaseException:
            stream.cancel()
            raise
        headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
        return StreamingResponse(self._sse(first, stream, call),
                                 media_type="text/event-stream", headers=headers)

    async def _sse(
        self, first: str | StreamEnd, stream: DeploymentResponseGenerator, call: GenerateCall
    ) -> AsyncIterator[str]:
        request_id = call.request_id
        finished = False
        self._residency.enter(call.model)
        try:
            item = first
            while not isinstance(item, StreamEnd):
                yield item
                item = await stream.__anext__()
            finished = True
            yield _DONE
        except StopAsyncIteration:
            finished = True
            yield _DONE
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Headers are gone; report the error in-band the way vLLM and OpenAI do.
            _, body, _ = error_payload(exc, request_id)
            finished = True
            yield f"data: {json.dumps(body)}\n\n"
            yield _DONE
        finally:
            self._residency.leave(call.model)
            if not finished:
                stream.cancel()  # client went away: abort the engine request

    async def _models(self, request: Request, request_id: str) -> Response:
        cards = [model_card(m.name, self._created, m.model or m.name)
                 for m in self._config.models]
        return _json_response({"object": "list", "data": cards})

    async def _model(self, model_id: str) -> Response:
        name = self._names.get(model_id)
        if name is None or name != model_id:
            raise ModelNotFound(f"the model {model_id!r} does not exist", param="model")
        m = self._config.model(name)
        return _json_response(model_card(m.name, self._created, m.model or m.name))

    async def _health(self, request: Request, request_id: str) -> Response:
        return _json_response({"status": "ok"})


IngressDeployment = serve.deployment(Ingress, name="ingress")
