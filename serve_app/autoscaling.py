"""The application-level autoscaling policy: Serve's hands for the residency controller.

Serve calls `ResidencyPolicy.__call__` about every 0.1 s inside its own controller with the
autoscaling context of every deployment of the application. The policy sends the running replica
counts to the Roundhouse controller actor and answers with the controller's last desired counts;
it never waits on the actor (the answer arrives on a later tick), because blocking here would
stall Serve itself.

Serve's traps this works around (Ray Serve 2.60):
- a deployment at 0 replicas with requests queued at a handle is forced to 1 replica by Serve's
  cold-start path whenever the policy returns a number for it, so a model that should stay cold
  is left out of the answer instead of being answered with 0;
- the policy object is re-created on every redeploy, so it holds no state worth keeping: the
  decisions live in the detached controller actor.

Enable it per application in the Serve config:

    autoscaling_policy:
      policy_function: serve_app.autoscaling:ResidencyPolicy
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger("ray.serve")

_LOOKUP_EVERY_S = 1.0
# Without an answer for this long, the policy stops steering and Serve keeps its targets.
_STALE_S = 10.0


class ResidencyPolicy:
    def __init__(self, **_: Any) -> None:
        self._actor: Any = None
        self._looked_up_at = -_LOOKUP_EVERY_S
        self._pending: Any = None
        self._targets: dict[str, int] = {}
        self._answered_at = -_STALE_S
        self._sent_at = -1.0
        # The controller says how soon it wants the next report: every Serve tick (0.1 s) while
        # models load or drain, once a second when nothing changes.
        self._poll_s = 0.1

    def __call__(self, contexts: dict[Any, Any]) -> tuple[dict[Any, int], dict[Any, Any]]:
        if not contexts:
            return {}, {}
        report = {dep.name: {"current": int(ctx.current_num_replicas),
                             "target": int(ctx.target_num_replicas)}
                  for dep, ctx in contexts.items()}
        app_name = next(iter(contexts)).app_name
        try:
            self._exchange(app_name, report)
        except Exception as exc:  # never let a controller problem break Serve's loop
            logger.warning("roundhouse autoscaling policy: %s", exc)
            self._actor, self._pending = None, None
        if time.monotonic() - self._answered_at > _STALE_S:
            return {}, {}
        return decide(contexts, self._targets), {}

    def _exchange(self, app_name: str, report: dict[str, dict[str, int]]) -> None:
        import ray

        from serve_app.controller import lookup

        if self._pending is not None:
            ready, _ = ray.wait([self._pending], timeout=0)
            if not ready:
                return
            ref, self._pending = self._pending, None
            try:
                answer = ray.get(ref)
                self._targets = dict(answer["targets"])
                self._poll_s = float(answer.get("poll_s", 0.1))
                self._answered_at = time.monotonic()
            except Exception:
                self._actor = None  # gone or restarting: look it up again
        if self._actor is None:
            now = time.monotonic()
            if now - self._looked_up_at < _LOOKUP_EVERY_S:
                return
            self._looked_up_at = now
            self._actor = lookup(app_name)
            if self._actor is None:
                return
        now = time.monotonic()
        if now - self._sent_at >= self._poll_s - 0.01:
            self._sent_at = now
            self._pending = self._actor.observe.remote(report)


def decide(contexts: dict[Any, Any], targets: dict[str, int]) -> dict[Any, int]:
    """Desired replicas per deployment, leaving out what Serve must not touch: deployments the
    controller does not steer (the ingress) and cold models that should stay cold."""
    decisions: dict[Any, int] = {}
    for dep, ctx in contexts.items():
        desired = targets.get(dep.name)
        if desired is None:
            continue
        if desired == 0 and ctx.current_num_replicas == 0 and ctx.target_num_replicas == 0:
            continue
        decisions[dep] = desired
    return decisions
