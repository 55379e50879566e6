from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app.policy.residency import (
    HOLDING,
    Action,
    ModelSpec,
    ModelStatus,
    State,
    check_memory_plan,
    decayed,
    held_gib,
    plan_load,
)

SPECS = {
    "chat": ModelSpec("chat", 18.0, pinned=True),
    "code": ModelSpec("code", 24.0),
    "reasoning": ModelSpec("reasoning", 46.0),
    "small": ModelSpec("small", 8.0),
}
BUDGET = 76.0


def status(**states: tuple[State, float, float]) -> dict[str, ModelStatus]:
    return {n: ModelStatus(s, used, rate) for n, (s, used, rate) in states.items()}


def test_loads_when_memory_is_free() -> None:
    plan = plan_load("code", SPECS, status(chat=(State.ACTIVE, 1, 5)), BUDGET)
    assert plan.action == Action.LOAD and plan.evict == ()
    assert "free 58.0 GiB" in plan.reason


def test_ready_when_active_or_loading() -> None:
    for state in (State.ACTIVE, State.LOADING):
        plan = plan_load("code", SPECS, status(code=(state, 1, 1)), BUDGET)
        assert plan.action == Action.READY


def test_evicts_least_recently_used_unpinned_model() -> None:
    now = status(chat=(State.ACTIVE, 9, 50), code=(State.ACTIVE, 5, 3),
                 small=(State.ACTIVE, 7, 1))
    plan = plan_load("reasoning", SPECS, now, BUDGET)
    # free = 76 - 50 = 26; reasoning needs 46: evicting code (LRU) frees 24 -> 50.
    assert plan.action == Action.LOAD and plan.evict == ("code",)
    assert plan.reason.startswith("evict code: least recently used, reasoning needs 46.0 GiB")


def test_most_requested_is_protected_while_another_victim_exists() -> None:
    # code is least recently used but far more requested than small: small goes first.
    specs = {**SPECS, "code": ModelSpec("code", 10.0)}
    now = status(chat=(State.ACTIVE, 9, 1), code=(State.ACTIVE, 1, 100),
                 small=(State.ACTIVE, 5, 1), reasoning=(State.COLD, 0, 0))
    specs["other"] = ModelSpec("other", 45.0)
    plan = plan_load("other", specs, now, BUDGET)
    # free = 76 - 36 = 40; need 45: one victim is enough, and it must be small, not code.
    assert plan.evict == ("small",)


def test_pinned_models_are_never_evicted() -> None:
    specs = {"chat": ModelSpec("chat", 40.0, pinned=True), "big": ModelSpec("big", 40.0)}
    plan = plan_load("big", specs, status(chat=(State.ACTIVE, 0, 0)), 76.0)
    assert plan.action == Action.REFUSE
    assert "pinned models hold 40.0 GiB of the 76.0 GiB budget" in plan.reason


def test_waits_while_loads_hold_the_memory() -> None:
    now = status(chat=(State.ACTIVE, 1, 1), code=(State.LOADING, 2, 1))
    plan = plan_load("reasoning", SPECS, now, BUDGET)
    assert plan.action == Action.WAIT


def test_draining_memory_counts_as_soon_free() -> None:
    now = status(chat=(State.ACTIVE, 1, 1), code=(State.DRAINING, 2, 1))
    plan = plan_load("reasoning", SPECS, now, BUDGET)
    assert plan.action == Action.LOAD and plan.evict == ()
    assert "draining 24.0 GiB" in plan.reason


def test_decay_halves_per_half_life() -> None:
    assert decayed(8.0, 60.0, 60.0) == pytest.approx(4.0)
    assert decayed(8.0, 0.0, 60.0) == 8.0


def test_memory_plan_arithmetic_in_message() -> None:
    assert check_memory_plan(SPECS, BUDGET) == []
    problems = check_memory_plan({**SPECS, "huge": ModelSpec("huge", 66.0)}, BUDGET)
    assert problems == ["pinned models plus the largest on-demand model do not fit: "
                        "chat 18.0 GiB + huge 66.0 GiB = 84.0 GiB > 76.0 GiB"]
    assert "more than the whole budget" in check_memory_plan(
        {"x": ModelSpec("x", 90.0)}, BUDGET)[0]


# --- property tests: random demand sequences against the invariants in DESIGN.md ----------

NAMES = ["a", "b", "c", "d", "e"]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[str, ModelSpec], float, list[str]]:
    budget = draw(st.floats(min_value=10, max_value=100))
    specs: dict[str, ModelSpec] = {}
    pinned_gib = 0.0
    for name in NAMES:
        mem = draw(st.floats(min_value=1, max_value=budget))
        pinned = draw(st.booleans()) and pinned_gib + mem <= budget / 2
        pinned_gib += mem if pinned else 0
        specs[name] = ModelSpec(name, mem, pinned)
    demands = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=40))
    return specs, budget, demands


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_invariants_hold_for_any_demand_sequence(
    scenario: tuple[dict[str, ModelSpec], float, list[str]],
) -> None:
    specs, budget, demands = scenario
    state = {n: ModelStatus(State.ACTIVE if s.pinned else State.COLD) for n, s in specs.items()}
    for clock, demand in enumerate(demands, start=1):
        before = dict(state)
        plan = plan_load(demand, specs, state, budget)
        for victim in plan.evict:
            assert not specs[victim].pinned, "a pinned model was evicted"
            assert before[victim].state == State.ACTIVE
            state[victim] = ModelStatus(State.COLD, before[victim].last_used_s,
                                        before[victim].recent_requests)
        if plan.action == Action.LOAD:
            state[demand] = ModelStatus(State.ACTIVE, float(clock),
                                        before[demand].recent_requests + 1)
        if plan.action == Action.REFUSE:
            pinned = sum(s.memory_gib for n, s in specs.items() if s.pinned and n != demand)
            assert specs[demand].memory_gib + pinned > budget
        else:
            assert plan.action in (Action.LOAD, Action.READY), plan  # nothing loads here
            assert state[demand].state == State.ACTIVE
        assert held_gib(specs, state) <= budget + 1e-6, "memory budget exceeded"
        assert all(state[n].state in HOLDING for n, s in specs.items() if s.pinned)


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_victims_are_evicted_least_recently_used_first(
    scenario: tuple[dict[str, ModelSpec], float, list[str]],
) -> None:
    specs, budget, _ = scenario
    state = {n: ModelStatus(State.ACTIVE, float(i), 0.0) for i, n in enumerate(NAMES)}
    for demand in NAMES:
        rest = {n: s for n, s in state.items() if n != demand}
        if held_gib(specs, rest) > budget:
            continue  # not a reachable state
        current = {**rest, demand: ModelStatus(State.COLD)}
        plan = plan_load(demand, specs, current, budget)
        used = [current[v].last_used_s for v in plan.evict]
        assert used == sorted(used)
