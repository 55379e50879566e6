"""The one Serve deployment class behind every model: wraps an Engine, speaks OpenAI shapes.

The ingress sends a `GenerateCall`; the replica answers with SSE-ready `data:` lines (so the
ingress only forwards bytes) followed by a `StreamEnd` carrying the usage, or with one complete
response body for non-streaming requests.
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

from deployments.engine import (
    Engine,
    EngineError,
    EngineOutput,
    EngineRequest,
    InvalidRequest,
    PromptTooLong,
)
from deployments.kv_admission import KvAdmission
from serve_app import metrics
from serve_app.config import (
    ConfigError,
    EngineSettings,
    ModelConfig,
    apply_engine_settings,
    deployment_name,
)
from serve_app.errors import BadRequest, GenerationTimeout, ModelDraining, ModelUnavailable
from serve_app.protocol import (
    GenerateCall,
    StreamEnd,
    Usage,
    chat_chunk,
    completion_chunk,
    full_response,
    response_id,
    usage_chunk,
)

logger = logging.getLogger("ray.serve.roundhouse")  # Serve's replica log files


def make_engine(config: ModelConfig) -> Engine:
    if config.engine == "fake":
        from deployments.fake_engine import FakeEngine
        from serve_app.config import FakeEngineConfig

        return FakeEngine(config.fake or FakeEngineConfig())
    from deployments.vllm_engine import VllmEngine

    return VllmEngine(config)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


class _Tally:
    """Per-request token counts: prompt tokens once per prompt, completion tokens per delta."""

    def __init__(self, num_prompts: int) -> None:
        self._prompt = [0] * num_prompts
        self.completion = 0

    def add(self, prompt_index: int, out: EngineOutput) -> None:
        self._prompt[prompt_index] = out.prompt_tokens
        self.completion += out.num_tokens

    def usage(self) -> Usage:
        return Usage(prompt_tokens=sum(self._prompt), completion_tokens=self.completion)


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
    async def __init__(self, config: dict[str, Any], engine: Engine | None = None) -> None:
        # `config` is the model's entry in the app's args; the deployment's `user_config`
        # (engine settings, see EngineSettings) goes on top of it.
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
        self._engine = engine or self._new_engine(self._config)
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
        return make_engine(config)

    async def _start_engine(self) -> None:
        """Starts self._engine; sizes the KV admission gate to it; tells the controller."""
        self._instance = uuid.uuid4().hex  # new with every engine start
        timeout_s = self._config.start_timeout_s
        try:
            await asyncio.wait_for(self._engine.start(), timeout=timeout_s)
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

    # --- generation -----------------------------------------------------------------------

    def _engine_requests(self, call: GenerateCall) -> list[EngineRequest]:
        if call.endpoint == "chat":
            return [EngineRequest(f"{call.request_id}-{uuid.uuid4().hex[:8]}", call.sampling,
                                  messages=call.messages)]
        return [
            EngineRequest(f"{call.request_id}-{i}-{uuid.uuid4().hex[:8]}", call.sampling,
                          prompt=prompt)
            for i, prompt in enumerate(call.prompts)
        ]

    async def _outputs(self, call: GenerateCall) -> AsyncIterator[tuple[int, EngineOutput]]:
        """(prompt index, output) from one engine stream per prompt, merged as they come.
        Past the request timeout the engine requests are aborted and 504 is raised."""
        requests = self._engine_requests(call)
        finished: set[str] = set()
        expired: list[bool] = []
        timer = None
        timeout_s = self._limits.request_timeout_s
        if timeout_s is not None:
            def expire() -> None:
                expired.append(True)
                for r in requests:
                    asyncio.get_running_loop().create_task(self._engine.abort(r.request_id))
            timer = asyncio.get_running_loop().call_later(timeout_s, expire)
        try:
            if len(requests) == 1:
                async for out in self._engine.generate(requests[0]):
                    yield 0, out
            else:
                async for item in self._merge(requests):
                    yield item
            finished.update(r.request_id for r in requests)
            if expired:
                raise GenerationTimeout(
                    f"model {self._name}: generation took longer than {timeout_s:g} s and was "
                    "stopped; lower max_tokens or retry")
        except PromptTooLong as exc:
            raise BadRequest(str(exc), param="messages" if call.messages else "prompt",
                             code="context_length_exceeded") from None
        except InvalidRequest as exc:
            raise BadRequest(str(exc), param=exc.param) from None
        except EngineError as exc:
            raise ModelUnavailable(f"model {self._name} failed: {exc}",
                                   retry_after_s=5) from None
        finally:
            if timer is not None:
                timer.cancel()
            for r in requests:
                if r.request_id not in finished:
                    with contextlib.suppress(Exception):
                        await self._engine.abort(r.request_id)

    async def _merge(
        self, requests: list[EngineRequest]
    ) -> AsyncIterator[tuple[int, EngineOutput]]:
        queue: asyncio.Queue[tuple[int, EngineOutput | BaseException | None]] = asyncio.Queue()

        async def pump(i: int, request: EngineRequest) -> None:
            try:
                async for out in self._engine.generate(request):
                    await queue.put((i, out))
                await queue.put((i, None))
            except Exception as exc:  # re-raised in the consumer below
                await queue.put((i, exc))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _admit(self, call: GenerateCall) -> KvAdmission:
        if self._draining:
            raise ModelDraining(f"model {self._name} is being stopped", retry_after_s=1)
        if not self._engine_ready.is_set():  # restarting with new settings
            await self._engine_ready.wait()
        if self._failed is not None:
            raise ModelUnavailable(f"model {self._name}: {self._failed}", retry_after_s=5)
        assert self._admission is not None
        if call.limits is not None and call.limits != self._limits:
            # The ingress was reconfigured (a live config update): take its limits.
            self._limits = call.limits
            self._admission.update(call.limits)
            logger.info("model %s: limits updated, KV budget %d tokens", self._name,
                        self._admission.budget_tokens)
        return self._admission

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

    async def stream(self, call: GenerateCall) -> AsyncIterator[str | StreamEnd]:
        admission = await self._admit(call)
        with self._tracked():
            async with admission.reserve(f"{call.request_id}-{uuid.uuid4().hex[:8]}",
                                         call.worst_case_tokens(self._engine.max_model_len)):
                async for item in self._stream(call):
                    yield item

    async def _stream(self, call: GenerateCall) -> AsyncIterator[str | StreamEnd]:
        rid, created, model = response_id(call.endpoint), call.created, call.model
        n = call.sampling.n
        tally = _Tally(max(1, len(call.prompts)))
        started: set[int] = set()
        async for prompt_index, out in self._outputs(call):
            tally.add(prompt_index, out)
            if not out.text and out.finish_reason is None:
                continue
            index = prompt_index * n + out.index
            reason = None if out.finish_reason == "abort" else out.finish_reason
            if call.endpoint == "chat":
                delta = {"content": out.text}
                if index not in started:
                    started.add(index)
                    delta = {"role": "assistant", "content": out.text}
                chunk = chat_chunk(rid, created, model, index, delta, reason,
                                   call.include_usage)
            else:
                chunk = completion_chunk(rid, created, model, index, out.text, reason,
                                         call.include_usage)
            yield _sse(chunk)
        usage = tally.usage()
        if call.include_usage:
            yield _sse(usage_chunk(rid, created, model, call.endpoint, usage))
        yield StreamEnd(usage)

    async def complete(self, call: GenerateCall) -> dict[str, Any]:
        admission = await self._admit(call)
        with self._tracked():
            async with admission.reserve(f"{call.request_id}-{uuid.uuid4().hex[:8]}",
                                         call.worst_case_tokens(self._engine.max_model_len)):
                return await self._complete(call)

    async def _complete(self, call: GenerateCall) -> dict[str, Any]:
        n = call.sampling.n
        texts: dict[int, list[str]] = {}
        reasons: dict[int, str | None] = {}
        tally = _Tally(max(1, len(call.prompts)))
        async for prompt_index, out in self._outputs(call):
            tally.add(prompt_index, out)
            index = prompt_index * n + out.index
            texts.setdefault(index, []).append(out.text)
            if out.finish_reason is not None:
                reasons[index] = out.finish_reason
        count = n * max(1, len(call.prompts))
        choices = [("".join(texts.get(i, [])), reasons.get(i)) for i in range(count)]
        return full_response(response_id(call.endpoint), call.created, call.model,
                             call.endpoint, choices, tally.usage())

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
