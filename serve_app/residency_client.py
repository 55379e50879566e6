"""The ingress side of the residency controller.

Every 0.5 s a heartbeat reports usage (requests per model, models with requests in flight) and
fetches which models are serving. A request for a serving model goes straight to it; any other
request first awaits `ensure_ready` on the controller, which loads the model (evicting others if
needed) or answers with a 503. The controller keeps an evicted replica alive, refusing new
requests, for longer than a heartbeat answer is trusted here, so the ingress never sends work to
a deployment that has already been stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from serve_app.controller import INGRESS_LEASE_S, PROTOCOL_VERSION, get_or_create, lookup
from serve_app.errors import ModelUnavailable, RoundhouseError, unwrap

logger = logging.getLogger("ray.serve.roundhouse")

HEARTBEAT_S = 0.5
# A heartbeat answered later than this counts as failed (the handle is kept, see _beat).
HEARTBEAT_TIMEOUT_S = 5.0


class ResidencyClient:
    def __init__(self, app_name: str, config: dict[str, Any]) -> None:
        self._app = app_name
        self._config = config
        self._actor: Any = None
        self._serving: dict[str, bool] = {}
        self._answered_at = -INGRESS_LEASE_S
        self._counts: Counter[str] = Counter()
        self._busy: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def start(self) -> None:
        await self._connect()
        self._task = asyncio.get_running_loop().create_task(self._beat())

    async def _connect(self) -> None:
        import ray

        actor = get_or_create(self._app)
        answer = await actor.configure.remote(self._config)
        if answer.get("version") != PROTOCOL_VERSION:
            # A controller from an older Roundhouse survived the redeploy: replace it.
            logger.warning("replacing a residency controller of protocol %s",
                           answer.get("version"))
            ray.kill(actor, no_restart=True)
            actor = get_or_create(self._app)
            await actor.configure.remote(self._config)
        self._actor = actor

    async def status(self) -> dict[str, Any]:
        """The controller's view of every model (states, memory, decisions)."""
        result: dict[str, Any] = await self._actor.status.remote()
        return result

    def _usage(self) -> tuple[dict[str, int], list[str]]:
        counts, self._counts = dict(self._counts), Counter()
        return counts, [m for m, n in self._busy.items() if n > 0]

    async def _beat(self) -> None:
        while True:
            counts, busy = self._usage()
            try:
                if self._actor is None:
                    self._actor = await asyncio.to_thread(lookup, self._app)
                    if self._actor is None:
                        await self._connect()
                async with asyncio.timeout(HEARTBEAT_TIMEOUT_S):  # not wait_for: 3.11 can
                    answer = await self._actor.heartbeat.remote(counts, busy)  # eat a cancel
                if not answer["configured"]:  # the controller restarted and lost its config
                    await self._actor.configure.remote(self._config)
                self._serving = dict(answer["serving"])
                self._answered_at = time.monotonic()
                if self._failing:
                    logger.info("residency controller reachable again")
                self._failing = False
            except Exception as exc:
                if not self._failing:
                    logger.warning("residency controller heartbeat failed: %s",
                                   type(exc).__name__)
                self._failing = True
                # A slow answer (a loaded machine) keeps the handle; a dead actor drops it, so
                # the next beat looks the (restarted or recreated) controller up again.
                if not isinstance(exc, TimeoutError):
                    self._actor = None
            await asyncio.sleep(HEARTBEAT_S)

    async def ready(self, model: str) -> None:
        """Returns when `model` may be sent a request; raises a RoundhouseError otherwise."""
        self._counts[model] += 1
        if self._serving.get(model) and time.monotonic() - self._answered_at < INGRESS_LEASE_S:
            return
        actor = self._actor
        if actor is None:  # the heartbeat lost it: a restarted controller may be there
            actor = self._actor = await asyncio.to_thread(lookup, self._app)
        if actor is None:
            raise ModelUnavailable("the residency controller is not reachable; retry shortly",
                                   retry_after_s=2)
        try:
            await actor.ensure_ready.remote(model, *self._usage())
        except Exception as exc:
            cause = unwrap(exc)
            if isinstance(cause, RoundhouseError):
                raise cause from None
            raise ModelUnavailable(f"the residency controller failed: {type(cause).__name__}",
                                   retry_after_s=2) from None
        self._serving[model] = True

    def invalidate(self, model: str) -> None:
        self._serving[model] = False

    def enter(self, model: str) -> None:
        self._busy[model] += 1

    def leave(self, model: str) -> None:
        self._busy[model] -= 1

    @contextlib.contextmanager
    def busy(self, model: str) -> Iterator[None]:
        self.enter(model)
        try:
            yield
        finally:
            self.leave(model)
