"""The residency controller: which models hold accelerator memory, and when that changes.

One named, detached Ray actor per application (`roundhouse-controller-<app>` in the `roundhouse`
namespace, its own row in the dashboard's Actors tab) owns the state of every model:

    cold --load--> loading --replica running--> active --evict/idle--> draining --> cold
                      \\--engine failed / timeout--> failed (backoff) --next demand--> loading

Who talks to it:
- the ingress: `ensure_ready(model)` before forwarding a request to a model it does not know to be
  serving (waits, bounded in number and time), and a `heartbeat` every 0.5 s that reports usage
  and fetches which models are serving;
- Serve's controller, through the application's autoscaling policy (serve_app/autoscaling.py):
  `observe` reports the running replicas of every deployment and takes back the desired replica
  count (0 or 1) per model. That is the only actuation: the policy never blocks, it acts on the
  last answer;
- the model replicas: `model_ready` (with the engine's process ids, for the memory probe) and
  `model_failed` (with the cause) from their constructor.

The decisions themselves (what to evict for a load, whether a memory plan holds) are pure
functions in serve_app/policy/residency.py; this module applies them, keeps time and logs each
decision once. `ResidencyController` is a plain class driven by an `Actuator`, so tests can run
it without Ray; `RoundhouseController` is the actor around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from serve_app import metrics
from serve_app.config import AppConfig, ModelConfig, ResidencyConfig, deployment_name
from serve_app.errors import ModelNotFound, ModelUnavailable
from serve_app.metrics import ControllerMetrics, NullControllerMetrics
from serve_app.policy.residency import (
    HOLDING,
    Action,
    ModelSpec,
    ModelStatus,
    State,
    decayed,
    failure_backoff_s,
    plan_load,
)

logger = logging.getLogger("roundhouse.controller")

NAMESPACE = "roundhouse"
PROTOCOL_VERSION = 1
# The ingress trusts a "serving" answer for this long; a model being evicted keeps its replica
# (refusing new requests) at least this long, so no ingress sends to a stopped deployment.
INGRESS_LEASE_S = 1.5
DRAIN_MIN_S = INGRESS_LEASE_S + 0.5
# Observations (from the autoscaling policy) older than this are not trusted.
OBSERVATION_FRESH_S = 3.0
# A model whose replica vanished is marked cold after this long at 0 running replicas.
LOST_GRACE_S = 1.0
# Serve may take a while to report a new replica as running after its constructor returns.
START_GRACE_S = 60.0
TICK_S = 0.1
# Without events (requests, reports) the controller still wakes this often for its timers.
IDLE_TICK_S = 1.0
# How often the autoscaling policy reports: often while something changes, rarely when steady
# (every report is an actor call, and on a small host that CPU comes out of token generation).
BUSY_POLL_S = 0.1
STEADY_POLL_S = 1.0
_EPS = 1e-6


def controller_name(app_name: str) -> str:
    return f"roundhouse-controller-{app_name}"


class Actuator(Protocol):
    async def drain(self, model: str) -> None:
        """Tell the model's replica to refuse new requests."""

    async def in_flight(self, model: str) -> int:
        """Requests the model's replica is still serving."""

    def memory_freed(self, pids: list[tuple[int, float]], node_id: str | None) -> bool:
        """Whether the engine processes of a stopped model are gone (their memory is free)."""

    def free_gpu_gib(self) -> float | None:
        """Free accelerator memory right now, or None where it cannot be measured (CPU)."""


@dataclass
class _Model:
    config: ModelConfig
    state: State = State.COLD
    desired: int = 0
    since: float = 0.0  # when the state was entered
    last_used_s: float = 0.0
    recent: float = 0.0
    recent_at: float = 0.0
    failures: int = 0
    retry_at: float = 0.0
    error: str = ""
    pids: list[tuple[int, float]] = field(default_factory=list)
    node_id: str | None = None
    running: int = 0
    zero_since: float | None = None
    # Its replica restarts its engine in place (new engine settings) until then: Serve counts
    # the replica as not running meanwhile, which must not read as a lost replica.
    restart_until: float = 0.0
    preload: bool = False  # load once at deploy, like a demand
    pending: bool = False  # a load is decided; waiting for victims to stop
    blocked: str = ""  # why a decided load has not started yet
    last_logged: str = ""
    last_load_s: float | None = None
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    first_wait: float = 0.0
    drain_task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(self.config.name, self.config.memory_gib, self.config.pinned)


class ResidencyController:
    def __init__(
        self,
        actuator: Actuator,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        metrics: ControllerMetrics | None = None,
    ) -> None:
        self._actuator = actuator
        self._metrics = metrics or NullControllerMetrics()
        self._clock = clock
        self._sleep = sleep
        self._config: AppConfig | None = None
        self._models: dict[str, _Model] = {}
        self._by_deployment: dict[str, str] = {}
        self._observed_at = -math.inf
        self._configured_at = 0.0
        self._decisions: deque[tuple[float, str]] = deque(maxlen=500)
        self._last_decision: dict[str, tuple[float, str]] = {}
        self._loads: deque[dict[str, Any]] = deque(maxlen=20)

    # --- configuration ----------------------------------------------------------------------

    @property
    def configured(self) -> bool:
        return self._config is not None

    def configure(self, config: dict[str, Any]) -> dict[str, Any]:
        """Takes the app config (again after a redeploy); state of unchanged models is kept."""
        parsed = AppConfig.model_validate(config)
        if self._config is not None and parsed == self._config:
            return {"version": PROTOCOL_VERSION}
        now = self._clock()
        models: dict[str, _Model] = {}
        for mc in parsed.models:
            m = self._models.get(mc.name) or _Model(mc, since=now)
            m.config = mc
            if (mc.pinned or mc.preload) and m.state in (State.COLD, State.FAILED):
                m.preload = True
            models[mc.name] = m
        for name, old in self._models.items():
            if name not in models:
                self._fail_waiters(old, ModelNotFound(f"the model {name!r} was removed"))
        self._models = models
        for m in models.values():
            self._metrics.set_state(m.name, str(m.state))
        self._by_deployment = {deployment_name(n): n for n in models}
        self._config = parsed
        self._configured_at = now
        self._log(f"configured: {', '.join(self._describe(m) for m in models.values())}; "
                  f"budget {parsed.budget_gib:.1f} GiB")
        self.reconcile()
        return {"version": PROTOCOL_VERSION}

    @staticmethod
    def _describe(m: _Model) -> str:
        kind = "pinned" if m.config.pinned else "preload" if m.config.preload else "on demand"
        return f"{m.name} {m.config.memory_gib:.1f} GiB {kind}"

    @property
    def _budget(self) -> float:
        assert self._config is not None
        return self._config.budget_gib

    # --- inputs -------------------------------------------------------------------------------

    def observe(self, report: dict[str, dict[str, int]]) -> dict[str, Any]:
        """From the autoscaling policy: running replicas per deployment. Returns the desired
        replicas per model deployment and when to report next."""
        now = self._clock()
        self._observed_at = now
        for dep, seen in report.items():
            name = self._by_deployment.get(dep)
            if name is not None:
                self._models[name].running = int(seen.get("current", 0))
        self.reconcile()
        busy = any(m.state in (State.LOADING, State.DRAINING) or m.waiters or m.pending
                   or m.running != m.desired for m in self._models.values())
        return {"targets": {deployment_name(m.name): m.desired for m in self._models.values()},
                "poll_s": BUSY_POLL_S if busy else STEADY_POLL_S}

    def heartbeat(self, counts: dict[str, int], busy: list[str]) -> dict[str, Any]:
        """From each ingress replica: requests forwarded per model since the last beat and the
        models with requests in flight. Returns which models may be sent requests directly."""
        now = self._clock()
        for name, count in counts.items():
            m = self._models.get(name)
            if m is None:
                continue
            m.recent = decayed(m.recent, now - m.recent_at, self._half_life) + count
            m.recent_at = now
            if count:
                m.last_used_s = now
        for name in busy:
            if name in self._models:
                self._models[name].last_used_s = now
        return {"configured": self.configured,
                "serving": {n: self._serving(m, now) for n, m in self._models.items()}}

    def model_ready(self, model: str, pids: list[tuple[int, float]], node_id: str | None) -> None:
        m = self._models.get(model)
        if m is None:
            return
        m.pids, m.node_id = [tuple(p) for p in pids], node_id  # type: ignore[misc]
        if m.restart_until:
            m.restart_until = 0.0
            self._log(f"restarted {model}: its engine is up with the new settings")
        self._log(f"engine up: {model} ({len(pids)} processes)", level=logging.DEBUG)
        self.reconcile()

    def model_restarting(self, model: str, within_s: float) -> None:
        """The model's replica restarts its engine with new settings (a model deployment's
        user_config changed), to be back within `within_s`; model_ready ends it."""
        m = self._models.get(model)
        if m is None:
            return
        m.restart_until = self._clock() + within_s
        self._log(f"restart {model}: new engine settings; its engine restarts in its replica",
                  model=model)

    def model_failed(self, model: str, error: str) -> None:
        m = self._models.get(model)
        if m is not None:
            m.restart_until = 0.0  # a failed engine restart: Serve replaces the replica
        if m is None or m.state not in (State.LOADING, State.COLD):
            return
        self._fail(m, error)
        self.reconcile()

    async def ensure_ready(self, model: str, counts: dict[str, int] | None = None,
                           busy: list[str] | None = None) -> None:
        """Returns once `model` is serving; raises ModelUnavailable (503) when it cannot be
        within the limits. A burst of callers causes one load. The caller's usage not yet sent
        in a heartbeat comes along, so the plan sees the latest use of every model."""
        if counts or busy:
            self.heartbeat(counts or {}, busy or [])
        m = self._models.get(model)
        if m is None:
            raise ModelNotFound(f"the model {model!r} does not exist", param="model")
        limits = self._limits
        now = self._clock()
        m.last_used_s = now
        if self._serving(m, now):
            return
        if m.state == State.FAILED and m.retry_at > now:
            raise ModelUnavailable(
                f"model {model} failed to load: {m.error}; the next attempt is in "
                f"{m.retry_at - now:.0f} s", retry_after_s=m.retry_at - now)
        if self._observed_at == -math.inf and now - self._configured_at > 10:
            raise ModelUnavailable(
                "no replica counts arrive from Serve: the application's autoscaling_policy must "
                "be serve_app.autoscaling:ResidencyPolicy (see configs/local.yaml)",
                retry_after_s=30)
        if len(m.waiters) >= limits.max_waiting_requests:
            raise ModelUnavailable(
                f"model {model} is {m.state}; {len(m.waiters)} requests are already waiting for "
                f"it (max_waiting_requests)", retry_after_s=self._eta(m, now))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not m.waiters:
            m.first_wait = now
        m.waiters.append(future)
        try:
            self.reconcile()
            async with asyncio.timeout(limits.load_timeout_s):  # not wait_for (see _drain)
                await asyncio.shield(future)
        except TimeoutError:
            why = m.blocked or f"it is {m.state}"
            raise ModelUnavailable(
                f"model {model} is not ready after {limits.load_timeout_s:.0f} s ({why})",
                retry_after_s=self._eta(m, self._clock())) from None
        finally:
            if future in m.waiters:
                m.waiters.remove(future)
            if not future.done():
                future.cancel()

    # --- the state machine ----------------------------------------------------------------------

    @property
    def _limits(self) -> ResidencyConfig:
        assert self._config is not None
        return self._config.residency

    @property
    def _half_life(self) -> float:
        return self._limits.popularity_half_life_s

    def _fresh(self, now: float) -> bool:
        return now - self._observed_at <= OBSERVATION_FRESH_S

    def _serving(self, m: _Model, now: float) -> bool:
        return m.state == State.ACTIVE and m.running >= 1 and self._fresh(now)

    def _eta(self, m: _Model, now: float) -> float:
        if m.state == State.LOADING:
            expected = m.last_load_s or 30.0
            return max(1.0, expected - (now - m.since))
        return 5.0

    def _set(self, m: _Model, state: State) -> None:
        m.state, m.since = state, self._clock()
        self._metrics.set_state(m.name, str(state))

    def reconcile(self) -> None:
        """One pass over every model: observed transitions, idle stops, then pending loads.
        Synchronous, so decisions never interleave."""
        if self._config is None:
            return
        now = self._clock()
        fresh = self._fresh(now)
        for m in self._models.values():
            self._observe_transitions(m, now, fresh)
        for m in self._models.values():
            if self._serving(m, now) and m.waiters:
                for f in m.waiters:
                    if not f.done():
                        f.set_result(None)
        idle = self._limits.idle_timeout_s
        if idle is not None:
            for m in self._models.values():
                unused_s = now - max(m.last_used_s, m.since)
                if (m.state == State.ACTIVE and not m.config.pinned and not m.waiters
                        and unused_s > idle):
                    self._start_drain(m, f"stop {m.name}: idle for {unused_s:.0f} s")
        wanted = [m for m in self._models.values()
                  if m.state in (State.COLD, State.FAILED) and m.retry_at <= now
                  and self._wanted(m)]
        wanted.sort(key=lambda m: (not m.config.pinned, not m.preload,
                                   m.first_wait if m.waiters else math.inf))
        for m in wanted:
            self._try_load(m, now)
        for m in self._models.values():
            if m.pending and not self._wanted(m):
                m.pending, m.blocked = False, ""

    @staticmethod
    def _wanted(m: _Model) -> bool:
        """Requests wait for it, or it belongs loaded (pinned, or preloaded and not yet up)."""
        return bool(m.waiters) or m.config.pinned or m.preload

    def _observe_transitions(self, m: _Model, now: float, fresh: bool) -> None:
        if m.state == State.LOADING:
            if m.running >= 1 and fresh:
                m.last_load_s = now - m.since
                self._metrics.loaded(m.name, m.last_load_s)
                self._loads.append({"model": m.name, "finished": time.time(),
                                    "duration_s": round(m.last_load_s, 1), "outcome": "ready"})
                self._set(m, State.ACTIVE)
                m.failures, m.error, m.preload, m.pending, m.blocked = 0, "", False, False, ""
                m.last_used_s = max(m.last_used_s, now)
                self._log(f"ready {m.name}: loaded in {m.last_load_s:.1f} s")
            elif now - m.since > m.config.start_timeout_s + START_GRACE_S:
                self._fail(m, f"no running replica {now - m.since:.0f} s after the load began")
        elif m.state == State.ACTIVE:
            if fresh and m.running == 0 and now < m.restart_until:
                m.zero_since = None  # restarting its engine in place, not lost
            elif fresh and m.running == 0:
                if m.zero_since is None:
                    m.zero_since = now
                elif now - m.zero_since >= LOST_GRACE_S:
                    m.zero_since = None
                    m.desired = 0
                    self._set(m, State.COLD)
                    self._log(f"lost {m.name}: its replica stopped; it loads again on the next "
                              "request", level=logging.WARNING)
            else:
                m.zero_since = None
        elif m.state in (State.COLD, State.FAILED) and fresh and m.running >= 1:
            # A replica we did not start: the controller restarted, or Serve replaced one.
            held = self._held(exclude=m.name)
            self._set(m, State.ACTIVE)
            m.desired = 1
            m.last_used_s = max(m.last_used_s, now)
            if held + m.config.memory_gib > self._budget + _EPS and not m.config.pinned:
                self._start_drain(m, f"evict {m.name}: found running beyond the budget "
                                     f"({held + m.config.memory_gib:.1f} GiB > "
                                     f"{self._budget:.1f} GiB)")
            else:
                self._log(f"adopt {m.name}: found a running replica")

    def _held(self, exclude: str | None = None) -> float:
        return sum(m.config.memory_gib for m in self._models.values()
                   if m.state in HOLDING and m.name != exclude)

    def _try_load(self, m: _Model, now: float) -> None:
        specs = {n: x.spec for n, x in self._models.items()}
        view = {n: ModelStatus(
                    State.LOADING if (x.pending and n != m.name
                                      and x.state in (State.COLD, State.FAILED)) else x.state,
                    x.last_used_s,
                    decayed(x.recent, now - x.recent_at, self._half_life))
                for n, x in self._models.items()}
        view[m.name] = ModelStatus(State.COLD, m.last_used_s, view[m.name].recent_requests)
        plan = plan_load(m.name, specs, view, self._budget)
        if plan.action == Action.REFUSE:
            self._log_once(m, f"refuse {m.name}: {plan.reason}", logging.ERROR)
            m.preload = False
            self._fail_waiters(m, ModelUnavailable(f"model {m.name} cannot be loaded: "
                                                   f"{plan.reason}"))
            return
        if plan.action == Action.WAIT:
            m.blocked = plan.reason
            self._log_once(m, f"wait {m.name}: {plan.reason}")
            return
        if plan.action != Action.LOAD:
            return
        if plan.evict:
            self._log_once(m, plan.reason)
        for victim in plan.evict:
            self._start_drain(self._models[victim], None)
        m.pending = True
        held = self._held(exclude=m.name)
        if held + m.config.memory_gib > self._budget + _EPS:
            draining = [x.name for x in self._models.values() if x.state == State.DRAINING]
            m.blocked = (f"waiting for {', '.join(draining) or 'other models'} to stop: "
                         f"{m.name} needs {m.config.memory_gib:.1f} GiB, "
                         f"{self._budget - held:.1f} GiB free")
            return
        free_gpu = self._actuator.free_gpu_gib()
        if free_gpu is not None and free_gpu + 0.25 < m.config.memory_gib:
            m.blocked = (f"waiting for accelerator memory: {m.name} needs "
                         f"{m.config.memory_gib:.1f} GiB, the device has {free_gpu:.1f} GiB free")
            self._log_once(m, f"wait {m.name}: {m.blocked}")
            if m.waiters and now - m.first_wait > self._limits.memory_probe_timeout_s:
                self._fail_waiters(m, ModelUnavailable(
                    f"model {m.name} cannot load: {m.blocked} after "
                    f"{now - m.first_wait:.0f} s", retry_after_s=30))
            return
        self._set(m, State.LOADING)
        self._metrics.load_started(m.name)
        m.desired, m.pending, m.blocked = 1, False, ""
        why = "pinned" if m.config.pinned else "preload" if m.preload else (
            f"{len(m.waiters)} waiting")
        self._log(f"load {m.name}: {why}; needs {m.config.memory_gib:.1f} GiB, "
                  f"free {self._budget - held:.1f} GiB")

    def _fail(self, m: _Model, error: str) -> None:
        limits = self._limits
        m.failures += 1
        backoff = failure_backoff_s(m.failures, limits.failure_backoff_s,
                                    limits.max_failure_backoff_s)
        if m.state == State.LOADING:
            self._loads.append({"model": m.name, "finished": time.time(),
                                "duration_s": round(self._clock() - m.since, 1),
                                "outcome": "failed"})
        self._set(m, State.FAILED)
        self._metrics.failed(m.name)
        m.desired, m.pending, m.blocked = 0, False, ""
        m.error = _short(error)
        m.retry_at = self._clock() + backoff
        self._log(f"failed {m.name}: {m.error}; failure {m.failures}, next attempt in "
                  f"{backoff:.0f} s", level=logging.ERROR)
        self._fail_waiters(m, ModelUnavailable(
            f"model {m.name} failed to load: {m.error}", retry_after_s=backoff))

    def _fail_waiters(self, m: _Model, error: Exception) -> None:
        for f in m.waiters:
            if not f.done():
                f.set_exception(error)
        m.waiters = []

    def _start_drain(self, m: _Model, reason: str | None) -> None:
        if m.state != State.ACTIVE or m.config.pinned:
            return
        if reason:
            self._log(reason)
        self._set(m, State.DRAINING)
        self._metrics.evicted(m.name)
        m.drain_task = asyncio.get_running_loop().create_task(self._drain(m))

    async def _drain(self, m: _Model) -> None:
        limits = self._limits
        started = self._clock()
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation
            # that arrives as the call completes, and this loop would then never stop.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._actuator.drain(m.name)
            left = 0
            while True:
                try:
                    async with asyncio.timeout(5):
                        left = await self._actuator.in_flight(m.name)
                except Exception:
                    left = 0  # the replica is gone or unreachable: nothing left to wait for
                elapsed = self._clock() - started
                if left == 0 and elapsed >= DRAIN_MIN_S:
                    break
                if elapsed >= max(limits.drain_timeout_s, DRAIN_MIN_S):
                    self._log(f"drain timeout {m.name}: stopping with {left} requests in flight",
                              level=logging.WARNING)
                    break
                await self._sleep(TICK_S)
            m.desired = 0
            self._log(f"stop {m.name}: drained in {self._clock() - started:.1f} s")
            stop_at = self._clock()
            warned = False
            while not (m.running == 0 and self._observed_at > stop_at
                       and self._actuator.memory_freed(m.pids, m.node_id)):
                waited = self._clock() - stop_at
                if waited > limits.memory_probe_timeout_s and not warned:
                    warned = True
                    m.error = (f"memory of {m.name} not freed {waited:.0f} s after its stop "
                               f"({m.running} replicas running)")
                    self._log(m.error, level=logging.ERROR)
                    for other in self._models.values():
                        if other.pending:
                            other.blocked = m.error
                await self._sleep(TICK_S)
            m.pids, m.node_id, m.error = [], None, ""
            self._set(m, State.COLD)
            self._log(f"stopped {m.name}: memory free {self._clock() - stop_at:.1f} s after "
                      "the stop")
        finally:
            m.drain_task = None
            if m.state == State.DRAINING:  # cancelled: count it cold only once Serve says so
                m.desired = 0
        self.reconcile()

    async def run(self) -> None:
        """The clock: timeouts, backoffs and idle stops happen even without traffic."""
        while True:
            try:
                self.reconcile()
            except Exception:
                logger.exception("reconcile failed")
            await asyncio.sleep(IDLE_TICK_S)

    # --- reporting ---------------------------------------------------------------------------------

    def _log(self, message: str, level: int = logging.INFO, model: str | None = None) -> None:
        if level >= logging.INFO:
            now = time.time()
            self._decisions.append((now, message))
            # Decisions read "<verb> <model>: why" (or are logged with their model).
            head = message.partition(":")[0].split()
            subject = model or (head[-1] if head and head[-1] in self._models else None)
            if subject is not None:
                self._last_decision[subject] = (now, message)
        logger.log(level, message)

    def _log_once(self, m: _Model, message: str, level: int = logging.INFO) -> None:
        if message != m.last_logged:
            m.last_logged = message
            self._log(message, level, model=m.name)

    def status(self) -> dict[str, Any]:
        now = self._clock()
        models = {}
        for m in self._models.values():
            models[m.name] = {
                "state": str(m.state),
                "serving": self._serving(m, now),
                "pinned": m.config.pinned,
                "memory_gib": m.config.memory_gib,
                "desired_replicas": m.desired,
                "running_replicas": m.running,
                "waiting_requests": len(m.waiters),
                "recent_requests": round(decayed(m.recent, now - m.recent_at,
                                                 self._half_life), 2) if self._config else 0.0,
                "idle_s": round(now - m.last_used_s, 1) if m.last_used_s else None,
                "in_state_s": round(now - m.since, 1),
                "failures": m.failures,
                "retry_in_s": round(m.retry_at - now, 1) if m.retry_at > now else None,
                "last_load_s": round(m.last_load_s, 1) if m.last_load_s else None,
                "blocked": m.blocked or None,
                "error": m.error or None,
                "restarting_engine": now < m.restart_until,
                "last_decision": self._decision_dict(self._last_decision.get(m.name)),
            }
        return {
            "budget_gib": self._budget if self._config else None,
            "held_gib": self._held(),
            "observed_s_ago": round(now - self._observed_at, 1) if self._fresh(now) else None,
            "models": models,
            "decisions": [{"time": t, "message": msg} for t, msg in self._decisions],
            "recent_loads": list(self._loads),
        }

    @staticmethod
    def _decision_dict(decision: tuple[float, str] | None) -> dict[str, Any] | None:
        return None if decision is None else {"time": decision[0], "message": decision[1]}


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- the Ray side ---------------------------------------------------------------------------------


class RayActuator:
    """Talks to the model replicas through Serve handles and probes memory on this node."""

    def __init__(self, app_name: str) -> None:
        self._app = app_name
        self._handles: dict[str, Any] = {}

    def _handle(self, model: str) -> Any:
        if model not in self._handles:
            from ray import serve

            self._handles[model] = serve.get_deployment_handle(deployment_name(model),
                                                               app_name=self._app)
        return self._handles[model]

    async def drain(self, model: str) -> None:
        await self._handle(model).drain.remote()

    async def in_flight(self, model: str) -> int:
        stats = await self._handle(model).stats.remote()
        return int(stats["in_flight"])

    def memory_freed(self, pids: list[tuple[int, float]], node_id: str | None) -> bool:
        import psutil
        import ray

        if not pids or (node_id and node_id != ray.get_runtime_context().get_node_id()):
            return True  # cannot see them; Serve's replica count and Ray's resources decide
        for pid, created in pids:
            try:
                if abs(psutil.Process(pid).create_time() - created) < 0.01:
                    return False
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return True

    def free_gpu_gib(self) -> float | None:
        try:
            import pynvml  # shipped with vLLM's CUDA build (nvidia-ml-py)
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            if count == 0:
                return None
            free = [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).free
                    for i in range(count)]
            return float(max(free)) / 2**30
        except Exception:
            return None


def _make_actor_class() -> Any:
    import ray

    @ray.remote(  # type: ignore[call-overload]  # Ray's stubs lack max_concurrency
        num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=10000)
    class RoundhouseController:
        """The residency controller actor (see the module docstring)."""

        def __init__(self, app_name: str) -> None:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(
                "%(asctime)s %(levelname)s roundhouse.controller: %(message)s"))
            logger.handlers[:] = [handler]
            logger.setLevel(logging.INFO)
            logger.propagate = False
            self._core = ResidencyController(RayActuator(app_name),
                                             metrics=metrics.controller())
            self._loop_task: asyncio.Task[None] | None = None

        def _start(self) -> None:
            if self._loop_task is None:
                self._loop_task = asyncio.get_running_loop().create_task(self._core.run())

        async def configure(self, config: dict[str, Any]) -> dict[str, Any]:
            self._start()
            return self._core.configure(config)

        async def ensure_ready(self, model: str, counts: dict[str, int] | None = None,
                               busy: list[str] | None = None) -> None:
            self._start()
            await self._core.ensure_ready(model, counts, busy)

        async def heartbeat(self, counts: dict[str, int], busy: list[str]) -> dict[str, Any]:
            self._start()
            return self._core.heartbeat(counts, busy)

        async def observe(self, report: dict[str, dict[str, int]]) -> dict[str, Any]:
            self._start()
            return self._core.observe(report)

        async def model_ready(self, model: str, pids: list[tuple[int, float]],
                              node_id: str | None) -> None:
            self._core.model_ready(model, pids, node_id)

        async def model_restarting(self, model: str, within_s: float) -> None:
            self._core.model_restarting(model, within_s)

        async def model_failed(self, model: str, error: str) -> None:
            self._core.model_failed(model, error)

        async def status(self) -> dict[str, Any]:
            return self._core.status()

    return RoundhouseController


_ACTOR_CLASS: Any = None


def actor_class() -> Any:
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        _ACTOR_CLASS = _make_actor_class()
    return _ACTOR_CLASS


def get_or_create(app_name: str) -> Any:
    return actor_class().options(
        name=controller_name(app_name), namespace=NAMESPACE, lifetime="detached",
        get_if_exists=True).remote(app_name)


def lookup(app_name: str) -> Any | None:
    import ray

    try:
        return ray.get_actor(controller_name(app_name), namespace=NAMESPACE)
    except ValueError:
        return None
