"""The ingress deployment: parse -> validate -> pick the model -> forward -> stream back.

A plain Starlette request handler (no FastAPI) keeps the hop cheap; the model replicas produce
SSE-ready lines, so streaming here is forwarding strings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
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

from deployments.engine import PromptTooLong
from serve_app import metrics
from serve_app.auth import KeyTable, Principal, load_keys
from serve_app.config import AppConfig, LiveConfig, apply_live
from serve_app.errors import (
    BadRequest,
    Forbidden,
    MethodNotAllowed,
    ModelDraining,
    ModelNotFound,
    ModelUnavailable,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    UnsupportedMediaType,
    error_payload,
    is_replica_lost,
    unwrap,
)
from serve_app.policy.ratelimit import RateLimiter, Verdict
from serve_app.policy.routing import RouteDecision
from serve_app.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateCall,
    StreamEnd,
    call_from_chat,
    call_from_completion,
    model_card,
    validation_message,
)
from serve_app.residency_client import ResidencyClient
from serve_app.router import QUALITY_HEADER, build_router, decide, parse_body, route_input
from serve_app.tokens import TokenCounter, counter_for, max_model_len

logger = logging.getLogger("ray.serve.roundhouse")  # Serve's replica log files

_MAX_REQUEST_ID_LEN = 128
_DONE = "data: [DONE]\n\n"

Handler = Callable[[Request, str], Awaitable[Response]]
_Body = TypeVar("_Body", ChatCompletionRequest, CompletionRequest)


def _json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, separators=(",", ":"), ensure_ascii=False), status,
                    headers=headers, media_type="application/json")


def _request_id(request: Request) -> tuple[str, str]:
    """(the request id, a form of it safe for logs and engine request ids). Serve's proxy takes
    the client's x-request-id (or makes one), puts it in the request headers and echoes it on
    the response; error bodies carry the same value."""
    given = request.headers.get("x-request-id") or uuid.uuid4().hex
    if len(given) <= _MAX_REQUEST_ID_LEN and given.isprintable():
        return given, given
    return given, given[:_MAX_REQUEST_ID_LEN].encode("ascii", "backslashreplace").decode()


# A request the evicted replica turned away goes through the controller again, this often.
_MAX_ATTEMPTS = 3
# What /v1/status adds from a running model's replica.
_LIVE_STATS = ("in_flight", "queued_requests", "kv_reserved_tokens", "kv_budget_tokens",
               "kv_capacity_tokens", "replica", "engine_restarts")
# Paths that need no key, and paths that need an admin key (when auth is on).
_OPEN_PATHS = frozenset({"/health"})
_ADMIN_PATHS = frozenset({"/v1/status"})
# Paths that count against a key's requests per minute.
_GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


class Ingress:
    async def __init__(self, config: dict[str, Any], models: dict[str, DeploymentHandle]) -> None:
        self._args = self._config = AppConfig.model_validate(config)
        # The `replica` label of this replica's metrics; /v1/status shows it.
        self._replica = serve.get_replica_context().replica_tag
        self._residency = ResidencyClient(serve.get_replica_context().app_name, config)
        await self._residency.start()
        self._names = self._config.lookup()
        # Each ingress replica enforces its share of every key's limits (README, Gateway).
        self._limiter = RateLimiter(share=1 / self._config.ingress.num_replicas)
        self._apply(self._config)
        self._metrics = metrics.ingress()
        # Each model's tokenizer, loaded once (off the event loop: transformers is slow to import).
        self._counters: dict[str, TokenCounter] = await asyncio.to_thread(
            lambda: {m.name: counter_for(m) for m in self._config.models})
        self._handles = dict(models)
        self._stream_handles = {name: h.options(stream=True) for name, h in models.items()}
        self._max_body = self._config.ingress.max_body_bytes
        self._created = int(time.time())
        self._routes: dict[str, dict[str, Handler]] = {
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/completions": {"POST": self._completions},
            "/v1/models": {"GET": self._models},
            "/v1/route": {"POST": self._route},
            "/v1/status": {"GET": self._status},
            "/health": {"GET": self._health},
        }
        # Everything built so far (imports, config, the router's tables) lives as long as the
        # replica: keep it out of the garbage collector's full passes, which otherwise walk it
        # on the request path (the routing benchmark's p99 drops by about a third).
        gc.freeze()

    def _apply(self, config: AppConfig) -> None:
        """Takes routing, keys and limits from `config` (at start, and on reconfigure)."""
        # A key source that cannot be read fails the deploy: auth never silently falls open.
        keys = KeyTable(config.auth.enabled, load_keys(config.auth), config.lookup())
        router = build_router(config)
        self._config, self._router, self._keys = config, router, keys
        self._limiter.forget(keys.names)
        if not keys.enabled:
            logger.warning("auth is OFF: anyone who can reach this server may use every model "
                           "and the status endpoint; set auth.keys, auth.keys_file or "
                           "auth.keys_env (see `roundhouse make-key`)")

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's lightweight update: the ingress deployment's `user_config` (routing, keys,
        limits, default model; see LiveConfig) over the app args, applied to the running
        replica. Nothing restarts; the model replicas get new limits with the next request."""
        live = LiveConfig.model_validate(user_config or {})
        config = await asyncio.to_thread(apply_live, self._args, live)
        self._apply(config)
        logger.info("reconfigured: %d routing rules, %d API keys, limits of %s",
                    len(config.routing.rules), len(self._keys),
                    ", ".join(sorted(live.limits)) or "no model")

    async def __call__(self, request: Request) -> Response:
        echoed_id, request_id = _request_id(request)
        started = request.state.started = time.perf_counter()
        request.state.limit_headers = limit_headers = {}
        code: str | None = None
        try:
            response = await self._dispatch(request, request_id)
        except Exception as exc:
            status, body, headers = error_payload(exc, echoed_id)
            code = body["error"]["code"]
            route: RouteDecision | None = getattr(request.state, "route", None)
            if route is not None:
                headers = {**route.headers(), **headers}
            response = _json_response(body, status, headers)
        if limit_headers:
            response.headers.update(limit_headers)
        if request.url.path != "/health":
            self._record(request, request_id, response, code, time.perf_counter() - started)
        return response

    def _record(self, request: Request, request_id: str, response: Response, code: str | None,
                elapsed_s: float) -> None:
        route: RouteDecision | None = getattr(request.state, "route", None)
        status = response.status_code
        streaming = isinstance(response, StreamingResponse)
        model, rule = (route.model, route.rule) if route is not None else ("none", "none")
        principal: Principal | None = getattr(request.state, "principal", None)
        # Fields for JSON logs (Serve's logging_config encoding: JSON); the text line says the
        # same. The decision's reason names features and scores, never the request's text.
        fields = {"request_id": request_id, "method": request.method,
                  "path": request.url.path, "status_code": status, "model": model,
                  "rule": rule, "stream": streaming,
                  ("ttft_ms" if streaming else "duration_ms"): round(elapsed_s * 1000, 1),
                  "key": principal.name if principal is not None else None}
        logger.info("request %s %s %s -> %d in %.1f ms%s%s", request_id, request.method,
                    request.url.path, status, elapsed_s * 1000,
                    " (first token; streaming)" if streaming else "",
                    _route_log(route) if route is not None else "", extra=fields)
        self._metrics.request(model, rule, status)
        if status in (401, 403, 429):
            self._metrics.refused(model, code or str(status))
        if not streaming:  # a stream records itself at its end
            self._metrics.finished(model, False, elapsed_s)

    async def _dispatch(self, request: Request, request_id: str) -> Response:
        path = request.url.path.rstrip("/") or "/"
        methods = self._routes.get(path)
        if path not in _OPEN_PATHS:
            principal = self._keys.authenticate(request.headers.get("authorization"))
            request.state.principal = principal
            if path in _ADMIN_PATHS:
                self._keys.require_admin(principal)
            if path in _GENERATION_PATHS and methods is not None and request.method == "POST":
                self._charge(request, self._limiter.request(
                    principal.name, principal.limits, time.monotonic()))
        if methods is None and path.startswith("/v1/models/"):
            return await self._model(request, path.removeprefix("/v1/models/"))
        if methods is None:
            raise NotFound(f"no route for {request.method} {path}")
        handler = methods.get(request.method)
        if handler is None:
            raise MethodNotAllowed(f"{request.method} is not allowed on {path}; "
                                   f"use {', '.join(methods)}")
        return await handler(request, request_id)

    @staticmethod
    def _charge(request: Request, verdict: Verdict) -> None:
        """Records a rate-limit check's headers for the response; refuses when over."""
        request.state.limit_headers.update(verdict.headers)
        if verdict.allowed:
            return
        principal: Principal = request.state.principal
        per_minute = verdict.headers[f"x-ratelimit-limit-{verdict.kind}"]
        if verdict.retry_after_s == float("inf"):
            raise RateLimited(f"this request needs more {verdict.kind} than the API key "
                              f"{principal.name} may use in a minute ({per_minute}); ask for "
                              "fewer tokens (max_tokens, a shorter prompt)",
                              code=f"{verdict.kind}_limit_exceeded")
        raise RateLimited(f"rate limit of {per_minute} {verdict.kind} per minute reached for "
                          f"API key {principal.name}; retry after {verdict.retry_after_s:.1f} s",
                          code=f"{verdict.kind}_limit_exceeded",
                          retry_after_s=max(1.0, verdict.retry_after_s))

    def _permit(self, request: Request, decision: RouteDecision) -> RouteDecision:
        """The decision if the key may use its model; for a routed (not named) request, the
        first model of the fallback chain, then the default model, that the key may use."""
        principal: Principal = request.state.principal
        if principal.may_use(decision.model):
            return decision
        if decision.rule != "explicit":
            seen = {decision.model}
            candidate = self._router.fallback(decision.model)
            while candidate is not None and candidate not in seen:
                if principal.may_use(candidate):
                    return decision.with_fallback(candidate, "not allowed for this API key")
                seen.add(candidate)
                candidate = self._router.fallback(candidate)
            default = self._config.default
            if principal.may_use(default):
                return decision.with_fallback(default, "not allowed for this API key")
        raise Forbidden(f"the API key {principal.name} may not use model {decision.model}",
                        param="model")

    # --- request parsing ------------------------------------------------------------------

    async def _read_json(self, request: Request) -> dict[str, Any]:
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media and media != "application/json" and not media.endswith("+json"):
            raise UnsupportedMediaType(f"content type {media!r} is not supported; send the "
                                       "body as JSON with 'Content-Type: application/json'")
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

    # --- endpoints ------------------------------------------------------------------------

    async def _parse(self, request: Request, schema: type[_Body]) -> _Body:
        body = await self._read_json(request)
        try:
            parsed = schema.model_validate(body)
        except ValidationError as exc:
            message, param = validation_message(exc)
            raise BadRequest(message, param=param) from None
        limits = self._config.ingress
        if isinstance(parsed, ChatCompletionRequest):
            if len(parsed.messages) > limits.max_messages:
                raise BadRequest(f"{len(parsed.messages)} messages; at most "
                                 f"{limits.max_messages} are allowed", param="messages",
                                 code="too_many_messages")
            chars, param = sum(len(m.text()) for m in parsed.messages), "messages"
        else:
            chars, param = sum(map(len, parsed.prompts())), "prompt"
        if chars > limits.max_input_chars:
            raise BadRequest(f"the input has {chars} characters; at most "
                             f"{limits.max_input_chars} are allowed", param=param,
                             code="input_too_long")
        return parsed

    def _decide(self, request: Request, parsed: ChatCompletionRequest | CompletionRequest
                ) -> RouteDecision:
        decision = decide(self._router,
                          route_input(parsed, request.headers.get(QUALITY_HEADER)))
        request.state.route = decision
        decision = request.state.route = self._permit(request, decision)
        return decision

    async def _chat(self, request: Request, request_id: str) -> Response:
        parsed = await self._parse(request, ChatCompletionRequest)
        decision = self._decide(request, parsed)
        return await self._serve(request, call_from_chat(parsed, decision.model, request_id))

    async def _completions(self, request: Request, request_id: str) -> Response:
        parsed = await self._parse(request, CompletionRequest)
        decision = self._decide(request, parsed)
        return await self._serve(request,
                                 call_from_completion(parsed, decision.model, request_id))

    async def _serve(self, request: Request, call: GenerateCall) -> Response:
        """Generates with the routed model, or with its configured fallback when the routed
        model is failed or cannot be loaded (before anything was sent to the client)."""
        decision: RouteDecision = request.state.route
        try:
            return await self._generate(request, call, decision)
        except Exception as exc:
            cause = unwrap(exc)
            fallback = self._router.fallback(call.model)
            if fallback is None or not (isinstance(cause, ModelUnavailable)
                                        or is_replica_lost(cause)):
                raise
            if not request.state.principal.may_use(fallback):
                raise
            why = cause.message if isinstance(cause, ModelUnavailable) else "replica lost"
            decision = decision.with_fallback(fallback, why)
            request.state.route = decision
            logger.warning("request %s: %s unavailable, serving with fallback %s",
                           call.request_id, call.model, fallback)
            return await self._generate(request, dataclasses.replace(call, model=fallback),
                                        decision)

    async def _limit(self, call: GenerateCall) -> GenerateCall:
        """Applies the model's output cap and checks prompt + max_tokens against its context,
        with the prompt counted by the model's tokenizer; the counts go to the replica, which
        reserves KV cache from them."""
        model = self._config.model(call.model)
        limits = model.limits
        asked = call.sampling.max_tokens
        max_tokens = asked
        cap = limits.max_output_tokens
        if cap is not None and asked is not None and asked > cap:
            if not limits.clamp_max_tokens:
                raise BadRequest(f"max_tokens is {asked}, above the limit of {cap} output tokens "
                                 f"for model {model.name}; ask for at most {cap}",
                                 param="max_tokens", code="max_tokens_exceeded")
            max_tokens = cap
        counter = self._counters[model.name]
        texts = [m["content"] for m in call.messages] or list(call.prompts)
        count = (lambda: (counter.chat(call.messages),)) if call.endpoint == "chat" else (
            lambda: tuple(counter.text(p) for p in call.prompts))
        prompts = await asyncio.to_thread(count) if sum(map(len, texts)) > 8000 else count()
        context = max_model_len(model)
        if context is not None and counter.exact:
            for prompt in prompts:
                if prompt >= context or (asked is not None and prompt + max_tokens > context):
                    raise BadRequest(str(PromptTooLong(prompt, max_tokens, context)),
                                     param="messages" if call.messages else "prompt",
                                     code="context_length_exceeded")
        if asked is None and cap is not None:
            # The cap is only a default here: never more than the context leaves.
            room = min(context - p for p in prompts) if context is not None else cap
            max_tokens = max(1, min(cap, room))
        sampling = dataclasses.replace(call.sampling, max_tokens=max_tokens)
        return dataclasses.replace(call, sampling=sampling, prompt_tokens=prompts,
                                   limits=limits)

    def _charge_tokens(self, request: Request, call: GenerateCall) -> None:
        """Tokens per minute, charged up front as OpenAI counts them: each prompt + max_tokens
        for every output (the rest of the context when max_tokens is unset), the same worst
        case the model replica reserves in its KV cache."""
        if getattr(request.state, "tokens_charged", False):
            return  # a fallback's second count is not charged again
        request.state.tokens_charged = True
        principal: Principal = request.state.principal
        if principal.limits.tokens_per_minute is None:
            return
        total = call.worst_case_tokens(max_model_len(self._config.model(call.model)))
        self._charge(request, self._limiter.tokens(principal.name, principal.limits, total,
                                                   time.monotonic()))

    async def _generate(self, request: Request, call: GenerateCall,
                        decision: RouteDecision) -> Response:
        call = await self._limit(call)
        self._charge_tokens(request, call)
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            # Loads the model first if it is cold (waiting, bounded) or refuses with a 503.
            await self._residency.ready(call.model)
            try:
                return await self._forward(call, decision.headers(), request.state.started)
            except Exception as exc:
                if not isinstance(unwrap(exc), ModelDraining) or attempt == _MAX_ATTEMPTS:
                    raise
                self._residency.invalidate(call.model)
        raise AssertionError("unreachable")

    async def _forward(self, call: GenerateCall, headers: dict[str, str],
                       started: float) -> Response:
        if not call.stream:
            with self._residency.busy(call.model):
                result = await self._handles[call.model].complete.remote(call)
            usage = result.get("usage") or {}
            self._metrics.tokens(call.model, usage.get("prompt_tokens", 0),
                                 usage.get("completion_tokens", 0))
            return _json_response(result, headers=headers)
        stream: DeploymentResponseGenerator = self._stream_handles[call.model].stream.remote(call)
        try:
            # Wait for the first item before answering 200, so a request the model rejects
            # (prompt too long, model failed) still gets a proper status code.
            first = await stream.__anext__()
        except BaseException:
            stream.cancel()
            raise
        self._metrics.first_token(call.model, time.perf_counter() - started)
        headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
        return StreamingResponse(self._sse(first, stream, call, started),
                                 media_type="text/event-stream", headers=headers)

    async def _sse(
        self, first: str | StreamEnd, stream: DeploymentResponseGenerator, call: GenerateCall,
        started: float,
    ) -> AsyncIterator[str]:
        request_id = call.request_id
        finished = False
        self._residency.enter(call.model)
        try:
            item = first
            while not isinstance(item, StreamEnd):
                yield item
                item = await stream.__anext__()
            self._metrics.tokens(call.model, item.usage.prompt_tokens,
                                 item.usage.completion_tokens)
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
            elapsed_s = time.perf_counter() - started
            self._metrics.finished(call.model, True, elapsed_s)
            logger.info("request %s stream %s in %.1f ms", request_id,
                        "finished" if finished else "cancelled by the client",
                        elapsed_s * 1000, extra={
                            "request_id": request_id, "model": call.model, "stream": True,
                            "duration_ms": round(elapsed_s * 1000, 1),
                            "completed": finished})
            if not finished:
                stream.cancel()  # client went away: abort the engine request

    async def _route(self, request: Request, request_id: str) -> Response:
        """Dry run: the routing decision for a chat or completions body, nothing generated.
        `?endpoint=/v1/completions` picks the endpoint; by default `messages` or `prompt`
        tells it."""
        body = await self._read_json(request)
        parsed = parse_body(body, request.query_params.get("endpoint"))
        decision = decide(self._router,
                          route_input(parsed, request.headers.get(QUALITY_HEADER)))
        result = decision.as_dict()
        result["fallback"] = self._router.fallback(decision.model)
        return _json_response(result, headers=decision.headers())

    async def _models(self, request: Request, request_id: str) -> Response:
        principal: Principal = request.state.principal
        cards = [model_card(m.name, self._created, m.model or m.name)
                 for m in self._config.models if principal.may_use(m.name)]
        return _json_response({"object": "list", "data": cards})

    async def _model(self, request: Request, model_id: str) -> Response:
        name = self._names.get(model_id)
        if name is None or name != model_id or not request.state.principal.may_use(name):
            raise ModelNotFound(f"the model {model_id!r} does not exist", param="model")
        m = self._config.model(name)
        return _json_response(model_card(m.name, self._created, m.model or m.name))

    async def _status(self, request: Request, request_id: str) -> Response:
        """The controller's view of every model, with the live numbers of each running one
        (requests in flight and waiting for KV room, KV reserved) from its replica."""
        status = await self._residency.status()
        models: dict[str, dict[str, Any]] = status["models"]

        async def live(name: str) -> None:
            try:
                stats = await asyncio.wait_for(self._handles[name].stats.remote(), 2)
            except Exception:
                return  # stopping, or busy past the deadline: the controller's view stands
            models[name].update({key: stats.get(key) for key in _LIVE_STATS})

        await asyncio.gather(*(live(name) for name, info in models.items()
                               if info["running_replicas"] and name in self._handles))
        status["ingress_replica"] = self._replica
        return _json_response(status)

    async def _health(self, request: Request, request_id: str) -> Response:
        return _json_response({"status": "ok"})


def _route_log(route: RouteDecision) -> str:
    parts = f" model={route.model} rule={route.rule}"
    if route.language:
        parts += f" language={route.language}"
    if route.fallback_from:
        parts += f" fallback_from={route.fallback_from}"
    return f'{parts} reason="{route.reason}"'


IngressDeployment = serve.deployment(Ingress, name="ingress")
