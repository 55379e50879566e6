"""Which models hold accelerator memory: pure decisions, no Ray, no vLLM.

The controller owns the state and the clock; this module only answers "model X is wanted: what
must be evicted first, and may it load now?" and checks a memory plan at deploy time. Keeping it
pure lets property tests drive thousands of demand sequences through it in milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class State(StrEnum):
    COLD = "cold"
    LOADING = "loading"
    ACTIVE = "active"
    DRAINING = "draining"
    FAILED = "failed"


# States whose memory is taken (or about to be): they count against the budget.
HOLDING = frozenset({State.LOADING, State.ACTIVE, State.DRAINING})


@dataclass(frozen=True)
class ModelSpec:
    name: str
    memory_gib: float
    pinned: bool = False


@dataclass(frozen=True)
class ModelStatus:
    state: State = State.COLD
    last_used_s: float = 0.0  # monotonic time of the last request; 0 = never
    recent_requests: float = 0.0  # decayed request count (see `decayed`)


class Action(StrEnum):
    READY = "ready"  # already loading or active: nothing to do
    LOAD = "load"  # evict `evict` (in order), then load
    WAIT = "wait"  # memory is held by loads in progress; ask again when one finishes
    REFUSE = "refuse"  # can never fit beside the pinned models


@dataclass(frozen=True)
class Plan:
    action: Action
    model: str
    evict: tuple[str, ...] = ()
    reason: str = ""


def decayed(count: float, elapsed_s: float, half_life_s: float) -> float:
    """A request count that halves every `half_life_s`: "requested lately", not "ever"."""
    if elapsed_s <= 0:
        return count
    return count * math.pow(0.5, elapsed_s / half_life_s)


def _gib(value: float) -> str:
    return f"{value:.1f} GiB"


def held_gib(specs: Mapping[str, ModelSpec], status: Mapping[str, ModelStatus]) -> float:
    return sum(specs[n].memory_gib for n, s in status.items() if s.state in HOLDING)


def plan_load(
    demand: str,
    specs: Mapping[str, ModelSpec],
    status: Mapping[str, ModelStatus],
    budget_gib: float,
) -> Plan:
    """Decide how `demand` becomes resident without the held memory exceeding the budget.

    Victims are active, unpinned models, least recently used first; the most requested of them
    (by decayed count) goes last, so it is evicted only when no other victim frees enough.
    Draining models are already on their way out: their memory counts as soon-to-be free.
    """
    spec = specs[demand]
    current = status.get(demand, ModelStatus())
    if current.state in (State.LOADING, State.ACTIVE):
        return Plan(Action.READY, demand, reason=f"{demand} is {current.state}")

    pinned_elsewhere = sum(s.memory_gib for n, s in specs.items() if s.pinned and n != demand)
    if spec.memory_gib + pinned_elsewhere > budget_gib:
        return Plan(Action.REFUSE, demand, reason=(
            f"{demand} needs {_gib(spec.memory_gib)} but pinned models hold "
            f"{_gib(pinned_elsewhere)} of the {_gib(budget_gib)} budget"))

    others = {n: s for n, s in status.items() if n != demand}
    held = held_gib(specs, others)
    draining = sum(specs[n].memory_gib for n, s in others.items() if s.state == State.DRAINING)
    free = budget_gib - held
    if free + 1e-9 >= spec.memory_gib:
        return Plan(Action.LOAD, demand, reason=(
            f"load {demand}: needs {_gib(spec.memory_gib)}, free {_gib(free)}"))

    candidates = [n for n, s in others.items()
                  if s.state == State.ACTIVE and not specs[n].pinned]
    candidates.sort(key=lambda n: (others[n].last_used_s, n))
    need = spec.memory_gib - (free + draining)
    victims = _choose_victims(candidates, specs, others, need)
    reachable = free + draining + sum(specs[v].memory_gib for v in victims)
    if reachable + 1e-9 < spec.memory_gib:
        return Plan(Action.WAIT, demand, reason=(
            f"{demand} needs {_gib(spec.memory_gib)}; only {_gib(reachable)} can be freed now "
            "while other models are loading"))
    if not victims:
        return Plan(Action.LOAD, demand, reason=(
            f"load {demand} once draining models exit: needs {_gib(spec.memory_gib)}, "
            f"free {_gib(free)} + draining {_gib(draining)}"))
    why = ", ".join(victims)
    return Plan(Action.LOAD, demand, tuple(victims), reason=(
        f"evict {why}: least recently used, {demand} needs {_gib(spec.memory_gib)}, "
        f"free {_gib(free)}"))


def _take(order: list[str], specs: Mapping[str, ModelSpec], need: float) -> list[str]:
    """Victims in `order` until `need` GiB are freed, then drop the ones that were not needed
    (most recently used first), so no model is evicted for nothing."""
    taken: list[str] = []
    freed = 0.0
    for name in order:
        if freed + 1e-9 >= need:
            break
        taken.append(name)
        freed += specs[name].memory_gib
    for name in reversed(list(taken)):
        if freed - specs[name].memory_gib + 1e-9 >= need:
            taken.remove(name)
            freed -= specs[name].memory_gib
    return taken


def _choose_victims(
    lru: list[str],
    specs: Mapping[str, ModelSpec],
    status: Mapping[str, ModelStatus],
    need: float,
) -> list[str]:
    """Least recently used first, but the clearly most requested model is spared whenever the
    others can free enough without it."""
    if need <= 0:
        return []
    if len(lru) > 1:
        busiest = max(lru, key=lambda n: status[n].recent_requests)
        top = status[busiest].recent_requests
        if all(status[n].recent_requests < top for n in lru if n != busiest):
            spared = [n for n in lru if n != busiest]
            if sum(specs[n].memory_gib for n in spared) + 1e-9 >= need:
                return _take(spared, specs, need)
    return _take(lru, specs, need)


def check_memory_plan(specs: Mapping[str, ModelSpec], budget_gib: float) -> list[str]:
    """Problems with a memory plan, each with its arithmetic; empty when the plan holds.

    The plan holds when the pinned models plus the largest on-demand model fit the budget, so
    any single on-demand model can always be made resident by evicting the others.
    """
    problems: list[str] = []
    pinned = [s for s in specs.values() if s.pinned]
    on_demand = [s for s in specs.values() if not s.pinned]
    pinned_gib = sum(s.memory_gib for s in pinned)
    for s in specs.values():
        if s.memory_gib > budget_gib:
            problems.append(f"{s.name} needs {_gib(s.memory_gib)}, more than the whole budget "
                            f"of {_gib(budget_gib)}")
    if pinned_gib > budget_gib:
        parts = " + ".join(f"{s.name} {_gib(s.memory_gib)}" for s in pinned)
        problems.append(f"pinned models alone exceed the budget: {parts} = {_gib(pinned_gib)} "
                        f"> {_gib(budget_gib)}")
    elif on_demand:
        largest = max(on_demand, key=lambda s: s.memory_gib)
        total = pinned_gib + largest.memory_gib
        if total > budget_gib:
            parts = " + ".join(f"{s.name} {_gib(s.memory_gib)}" for s in (*pinned, largest))
            problems.append(f"pinned models plus the largest on-demand model do not fit: "
                            f"{parts} = {_gib(total)} > {_gib(budget_gib)}")
    return problems


def failure_backoff_s(failures: int, base_s: float, cap_s: float) -> float:
    """Seconds to wait before loading a model again after `failures` failed loads in a row:
    base, 2x base, 4x base, ... up to the cap."""
    if failures <= 0:
        return 0.0
    return float(min(cap_s, base_s * math.pow(2, min(failures - 1, 60))))
