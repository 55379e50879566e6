"""The one Serve deployment class behind every model: an engine and the admission gate in front
of it.

The ingress forwards a client's OpenAI request (`ForwardedRequest`); the replica runs it through
the engine's own OpenAI app (vLLM's, for the real engine) and answers with the whole response
(`call`) or a stream (`stream`: a `StreamHead` once the request is admitted and produced its
first bytes, then batches of bytes, then a `StreamEnd` with the usage). Admission lives here, in
one place (deployments/gate.py): output cap, KV reservation and queue, generation timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ray import serve

from deployments.asgi import Exchange, http_scope
from deployments.engine import Engine, EngineError, EngineFactory
from deployments.gate import ReplicaGate, RequestScope, scoped_context
from deployments.kv_admission import KvAdmission
from serve_app import metrics
from serve_app.config import (
    ConfigError,
    EngineSettings,
    ModelConfig,
    ModelLimits,
    apply_engine_settings,
    deployment_name,
)
from serve_app.errors import (
    BadRequest,
    ModelDraining,
    ModelUnavailable,
    RoundhouseError,
    engine_error,
    stream_error_event,
)
from serve_app.protocol import ForwardedRequest, Reply, StreamEnd, StreamHead

logger = logging.getLogger("ray.serve.roundhouse")  # Serve's replica log files

# The body fields that set a request's output limit, per endpoint (OpenAI's names).
OUTPUT_LIMIT_FIELDS = {
    "/v1/chat/completions": ("max_completion_tokens", "max_tokens"),
    "/v1/completions": ("max_tokens",),
    "/v1/responses": ("max_output_tokens",),
}
# An error event as vLLM's streaming generators write it (they report errors in-band).
_ERROR_EVENT = b'data: {"error"'


def default_engine_factory() -> EngineFactory:
    from deployments.vllm_engine import VllmEngine

    return VllmEngine


# How long an engine restart (new engine settings) lets the requests in flight finish before it
# stops the engine under them.
RESTART_DRAIN_S = 30.0
# Beyond the drain and the engine's start timeout, before the controller stops waiting for it.
RESTART_GRACE_S = 30.0


def _replica_user_config() -> dict[str, Any] | None:
    """This deployment's `user_config` as Serve holds it (None outside a Serve replica): read in
    __init__ so the first engine start already uses a model deployment's engine settings."""
    try:
        user_config = serve.get_replica_context()._deployment_config.user_config
    except Exception:
        return None
    return dict(user_config) if user_config else None


@serve.deployment(max_ongoing_requests=256, health_check_period_s=10, health_check_timeout_s=30)
class ModelServer:
    async def __init__(  # type: ignore[misc]  # Serve awaits an async __init__
            self, config: dict[str, Any], engine_factory: EngineFactory | None = None) -> None:
        # `config` is the model's entry in the app's args; the deployment's `user_config`
        # (engine settings, see EngineSettings) goes on top of it. `engine_factory` builds the
        # engine (vLLM's unless the app was built with another, as the tests do).
        self._base_config = ModelConfig.model_validate(config)
        self._name = self._base_config.name
        self._config = self._configured(_replica_user_config())
        try:  # the `replica` label of this replica's metrics
            self._replica = serve.get_replica_context().replica_tag
        except Exception:  # not in a Serve replica (unit tests)
            self._replica = ""
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False
        # Cleared while the engine restarts with new settings: new requests wait for it.
        self._engine_ready = asyncio.Event()
        self._engine_restarts = 0
        self._limits = self._config.limits
        self._admission: KvAdmission | None = None
        self._env_saved: dict[str, str | None] = {}
        self._failed: str | None = None  # why the engine is down after a failed restart
        self._factory = engine_factory or default_engine_factory()
        self._gate = ReplicaGate(self._name, lambda: self._admission, lambda: self._limits)
        self._engine = self._new_engine(self._config)
        await self._start_engine()

    def _configured(self, user_config: dict[str, Any] | None) -> ModelConfig:
        try:
            return apply_engine_settings(self._base_config, user_config)
        except ValueError as exc:
            raise ConfigError(f"model {self._name}: the user_config of "
                              f"{deployment_name(self._name)}: {exc}") from None

    def _new_engine(self, config: ModelConfig) -> Engine:
        """An engine for `config`. The user_config's env differs from the args' env (which Ray
        set for this process) in this process's environment while it applies; the engine's
        processes inherit it."""
        import os

        for key, value in self._env_saved.items():  # undo the previous settings' env
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        base = self._base_config.env
        changes: dict[str, str | None] = {k: v for k, v in config.env.items() if base.get(k) != v}
        changes.update({k: None for k in base.keys() - config.env.keys()})
        self._env_saved = {k: os.environ.get(k) for k in changes}
        for key, value in changes.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        return self._factory(config)

    async def _start_engine(self) -> None:
        """Starts self._engine; sizes the KV admission gate to it; tells the controller."""
        self._instance = uuid.uuid4().hex  # new with every engine start
        timeout_s = self._config.start_timeout_s
        try:
            await asyncio.wait_for(self._engine.start(self._gate), timeout=timeout_s)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await self._engine.shutdown()
            cause = (f"engine did not start within {timeout_s:.0f} s"
                     if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}")
            await _report("model_failed", self._name, cause)
            raise EngineError(f"model {self._name}: {cause}") from exc
        capacity = await self._engine.kv_capacity_tokens()
        if self._admission is None:
            recorder = metrics.model()
            self._admission = KvAdmission(
                self._name, capacity, self._limits,
                on_change=lambda stats: recorder.admission(
                    self._name, {**stats, "in_flight": self._in_flight}))
            recorder.admission(self._name, self._admission.stats())
        else:
            self._admission.update(self._limits, capacity_tokens=capacity)
        logger.info("model %s: engine ready, KV budget %d of %d tokens", self._name,
                    self._admission.budget_tokens, capacity)
        self._engine_ready.set()
        await _report("model_ready", self._name, _engine_processes(), _node_id())

    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Serve's lightweight update of this model's deployment (its `user_config` changed in
        a `serve deploy`): new engine settings restart this model's engine in place, inside
        the same replica; no other model is touched. Serve routes nothing new to the replica
        while this runs; requests that reach it anyway wait for the new engine. The requests
        in flight may finish first (up to RESTART_DRAIN_S)."""
        config = self._configured(dict(user_config) if user_config else None)
        if config == self._config:
            return
        changed = [k for k in EngineSettings.model_fields
                   if getattr(config, k) != getattr(self._config, k)]
        logger.info("model %s: engine settings changed (%s); restarting its engine, %d "
                    "requests in flight", self._name, ", ".join(changed), self._in_flight)
        self._engine_ready.clear()
        await _report("model_restarting", self._name,
                      RESTART_DRAIN_S + config.start_timeout_s + RESTART_GRACE_S)
        try:
            try:
                await asyncio.wait_for(self._idle.wait(), RESTART_DRAIN_S)
            except TimeoutError:
                logger.warning("model %s: %d requests still in flight after %.0f s; stopping "
                               "the engine under them", self._name, self._in_flight,
                               RESTART_DRAIN_S)
            await self._engine.shutdown()
            self._config = config
            self._engine = self._new_engine(config)
            self._engine_restarts += 1
            await self._start_engine()
        except BaseException as exc:
            # Waiting requests get 503 and the health check fails, so Serve replaces the
            # replica (which starts with these settings and reports why it cannot).
            self._failed = f"the engine restart with new settings failed: {exc}"
            self._engine_ready.set()
            await _report("model_failed", self._name, self._failed)
            raise

    # --- requests ---------------------------------------------------------------------------

    async def _admit(self, request: ForwardedRequest) -> ModelLimits:
        if self._draining:
            raise ModelDraining(f"model {self._name} is being stopped", retry_after_s=1)
        if not self._engine_ready.is_set():  # restarting with new settings
            await self._engine_ready.wait()
        if self._failed is not None:
            raise ModelUnavailable(f"model {self._name}: {self._failed}", retry_after_s=5)
        if request.limits is not None and request.limits != self._limits:
            # The ingress was reconfigured (a live config update): take its limits.
            self._limits = request.limits
            if self._admission is not None:
                self._admission.update(request.limits)
                logger.info("model %s: limits updated, KV budget %d tokens", self._name,
                            self._admission.budget_tokens)
        limits = self._limits
        cap = limits.max_output_tokens
        if cap is not None and not limits.clamp_max_tokens:
            for field in OUTPUT_LIMIT_FIELDS.get(request.path, ()):
                asked = request.body.get(field)
                if isinstance(asked, int) and not isinstance(asked, bool) and asked > cap:
                    raise BadRequest(f"{field} is {asked}, above the limit of {cap} output "
                                     f"tokens for model {self._name}; ask for at most {cap}",
                                     param=field, code="max_tokens_exceeded")
        return limits

    @contextlib.asynccontextmanager
    async def _exchange(self, request: ForwardedRequest
                        ) -> AsyncIterator[tuple[RequestScope, Exchange]]:
        """The request running through the engine's app, in a scope the gate reads; closed
        (the engine request aborted if still running) however the caller leaves."""
        limits = await self._admit(request)
        scope = RequestScope(request.request_id, limits)
        # ASCII escapes: a lone surrogate in a message is text to the engine, not a crash here.
        body = json.dumps(request.body, separators=(",", ":")).encode()
        with self._tracked():
            exchange = Exchange(self._engine.app, http_scope("POST", request.path), body,
                                context=scoped_context(scope))

            def stop() -> None:  # the generation timed out: abort it in the engine
                asyncio.ensure_future(exchange.close())

            scope.on_timeout = stop
            try:
                yield scope, exchange
            finally:
                scope.close()
                await exchange.close()

    def _failure(self, scope: RequestScope, exchange: Exchange, body: bytes
                 ) -> RoundhouseError | None:
        """Why the request failed, in our error table: the gate's own error first (a refusal,
        a timeout), then the engine app's error response."""
        if scope.error is not None:
            return scope.error
        if exchange.error is not None and not isinstance(exchange.error, asyncio.CancelledError):
            logger.warning("model %s: request %s failed in the engine app: %s", self._name,
                           scope.request_id, type(exchange.error).__name__)
            return ModelUnavailable(f"model {self._name} failed while serving the request",
                                    retry_after_s=5)
        if exchange.status is not None and exchange.status >= 400:
            return engine_error(exchange.status, body, self._name)
        return None

    async def call(self, request: ForwardedRequest) -> Reply:
        """The whole response of one request."""
        async with self._exchange(request) as (scope, exchange):
            body = await exchange.read_all()
            failure = self._failure(scope, exchange, body)
            if failure is not None:
                raise failure
            return Reply(exchange.status or 200, exchange.media_type, body, scope.usage())

    async def stream(self, request: ForwardedRequest
                     ) -> AsyncIterator[StreamHead | bytes | StreamEnd]:
        """A streamed response: nothing is sent before the request is admitted and produced
        its first bytes (so a refusal is a real status), then what the engine produced in
        each `stream_batch_ms` goes as one item."""
        async with self._exchange(request) as (scope, exchange):
            while not (exchange.finished or (scope.admitted.is_set() and exchange.pending())):
                await exchange.wait()
            chunks = exchange.take()
            first = b"".join(chunks)
            failure = self._failure(scope, exchange, first)
            if failure is None and first.startswith(_ERROR_EVENT) and not scope.admitted.is_set():
                # Refused in-band before any generation (vLLM reports stream errors that way):
                # still a real status here.
                failure = engine_error(None, _event_data(first), self._name)
            if failure is not None:
                raise failure
            yield StreamHead(exchange.status or 200, exchange.media_type,
                             self._checked(chunks, scope))
            interval_s = self._config.stream_batch_ms / 1000
            while not exchange.finished or exchange.pending():
                await exchange.wait()
                if interval_s and not exchange.finished:
                    await asyncio.sleep(interval_s)  # coalesce what comes meanwhile
                chunks = exchange.take()
                if exchange.finished and not exchange.pending():
                    tail = self._checked(chunks, scope)
                    if scope.error is not None:  # stopped under the engine (timeout)
                        tail += stream_error_event(request.path, scope.error, scope.request_id)
                    yield StreamEnd(tail, scope.usage())
                    return
                yield self._checked(chunks, scope)

    def _checked(self, chunks: list[bytes], scope: RequestScope) -> bytes:
        """The chunks as one item, with the engine's in-band error events in our error table
        (string codes, the request id)."""
        for i, chunk in enumerate(chunks):
            if chunk.startswith(_ERROR_EVENT):
                error = scope.error or engine_error(None, _event_data(chunk), self._name)
                chunks[i] = stream_error_event("", error, scope.request_id, done=False)
        return b"".join(chunks)

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        """Counts the request in flight (an engine restart waits for none to be left)."""
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    # --- lifecycle ------------------------------------------------------------------------

    async def check_health(self) -> None:
        if self._failed is not None:
            raise EngineError(f"model {self._name}: {self._failed}")
        if self._engine_ready.is_set():  # not while the engine restarts with new settings
            await self._engine.check_health()

    async def kv_capacity_tokens(self) -> int:
        return await self._engine.kv_capacity_tokens()

    async def drain(self) -> int:
        """Refuse new requests from now on (the controller is evicting this model); returns the
        requests still in flight."""
        if not self._draining:
            logger.info("model %s: draining, %d requests in flight", self._name, self._in_flight)
        self._draining = True
        return self._in_flight

    async def stats(self) -> dict[str, Any]:
        assert self._admission is not None
        return {"instance": self._instance, "replica": self._replica,
                "engine_restarts": self._engine_restarts,
                "restarting": int(not self._engine_ready.is_set()),
                "in_flight": self._in_flight,
                "draining": int(self._draining),
                "unfinished_requests": self._engine.num_unfinished(),
                "max_model_len": self._engine.max_model_len,
                "kv_capacity_tokens": await self._engine.kv_capacity_tokens(),
                **self._admission.stats()}

    async def __del__(self) -> None:
        await self._engine.shutdown()


def _event_data(event: bytes) -> bytes:
    """The JSON of an SSE `data:` event."""
    return event.removeprefix(b"data: ").split(b"\n", 1)[0]


def _engine_processes() -> list[tuple[int, float]]:
    """(pid, start time) of this replica and its children (vLLM's EngineCore): the processes
    whose exit frees the model's memory, for the controller's memory probe."""
    import os

    import psutil

    me = psutil.Process(os.getpid())
    procs = [me]
    with contextlib.suppress(psutil.Error):
        procs += me.children(recursive=True)
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out.append((p.pid, p.create_time()))
    return out


def _node_id() -> str | None:
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id())
    except Exception:
        return None


async def _report(method: str, *args: Any) -> None:
    """Tell the residency controller (best effort: tests may run a replica without one)."""
    try:
        from serve_app.controller import lookup

        app = serve.get_replica_context().app_name
        actor = lookup(app)
        if actor is not None:
            await asyncio.wait_for(getattr(actor, method).remote(*args), timeout=10)
    except Exception as exc:
        logger.warning("could not report %s to the controller: %s", method, type(exc).__name__)
