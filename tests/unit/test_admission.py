from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app.policy.admission import AdmissionError, KvLedger


def test_reserve_and_release() -> None:
    ledger = KvLedger(100)
    assert ledger.request("a", 60)
    assert not ledger.request("b", 50)  # waits
    assert ledger.waiting == ("b",) and ledger.reserved_tokens == 60
    assert ledger.release("a") == ["b"]
    assert ledger.reserved_tokens == 50 and ledger.waiting == ()
    assert ledger.release("a") == []  # idempotent


def test_larger_than_budget_is_refused() -> None:
    with pytest.raises(AdmissionError, match="KV budget is 100 tokens"):
        KvLedger(100).request("x", 101)


def test_one_lane_is_first_come_first_served() -> None:
    ledger = KvLedger(100)
    assert ledger.request("hold", 50)
    assert not ledger.request("long", 95)
    assert not ledger.request("short", 10)  # fits, but nothing overtakes within a lane
    assert ledger.release("hold") == ["long"]
    assert ledger.release("long") == ["short"]


def test_large_requests_keep_to_their_share() -> None:
    ledger = KvLedger(100, large_tokens=20, large_share=0.5)
    assert ledger.request("big1", 30) and not ledger.request("big2", 30)  # 60 > 50
    assert ledger.large_reserved_tokens == 30
    for i in range(7):  # the small lane still has the other 70
        assert ledger.request(f"s{i}", 10)
    assert ledger.available_tokens == 0
    assert ledger.release("big1") == ["big2"]


def test_one_large_request_is_always_allowed_its_lane() -> None:
    ledger = KvLedger(100, large_tokens=20, large_share=0.25)
    assert ledger.request("huge", 90)  # over the 25 share, but alone in it
    assert not ledger.request("big", 21)
    assert ledger.request("s", 10)


def test_a_large_request_is_not_bypassed_forever() -> None:
    ledger = KvLedger(100, max_bypass=2, large_tokens=20, large_share=0.5)
    assert ledger.request("hold", 15) and ledger.request("hold2", 15)
    assert ledger.request("fill", 15) and ledger.request("fill2", 15)
    assert not ledger.request("long", 45)  # its lane is empty, but 60 are held
    assert ledger.request("s1", 10)  # bypass 1
    assert ledger.request("s2", 10)  # bypass 2
    assert not ledger.request("s3", 10)  # now small requests wait behind it
    assert ledger.release("hold") == []
    assert ledger.release("hold2") == ["long"]  # 45 free: the long one goes first
    assert ledger.waiting == ("s3",) and ledger.holds("long")


def test_small_requests_pass_a_large_one_whose_lane_is_full() -> None:
    # Waiting for other large requests, not for small ones: those are not held up at all.
    ledger = KvLedger(100, max_bypass=1, large_tokens=20, large_share=0.5)
    assert ledger.request("big1", 40) and not ledger.request("big2", 40)
    assert all(ledger.request(f"s{i}", 5) for i in range(5))
    assert ledger.waiting == ("big2",)


def test_a_waiter_leaving_unblocks_the_ones_behind_it() -> None:
    ledger = KvLedger(100)
    ledger.request("a", 60)
    ledger.request("b", 50)
    ledger.request("c", 30)
    assert ledger.release("b") == ["c"]


def test_cancel_while_waiting() -> None:
    ledger = KvLedger(10)
    ledger.request("a", 10)
    ledger.request("b", 5)
    ledger.release("b")
    assert ledger.waiting == () and ledger.reserved_tokens == 10


ops = st.lists(st.tuples(st.sampled_from(["req", "rel"]), st.integers(0, 15),
                         st.integers(1, 120)), max_size=80)


@settings(max_examples=400, deadline=None)
@given(capacity=st.integers(1, 200), bypass=st.integers(0, 4),
       large=st.none() | st.integers(1, 100), share=st.floats(0.05, 1.0), script=ops)
def test_ledger_never_overcommits_and_never_leaks(
        capacity: int, bypass: int, large: int | None, share: float,
        script: list[tuple[str, int, int]]) -> None:
    ledger = KvLedger(capacity, max_bypass=bypass, large_tokens=large, large_share=share)
    known: dict[str, int] = {}
    for op, ident, tokens in script:
        rid = f"r{ident}"
        if op == "req" and rid not in known:
            try:
                ledger.request(rid, tokens)
                known[rid] = tokens
            except AdmissionError:
                assert tokens > capacity
        elif op == "rel":
            ledger.release(rid)
            known.pop(rid, None)
        held = {r: t for r, t in known.items() if ledger.holds(r)}
        assert ledger.reserved_tokens == sum(held.values()) <= capacity
        large_held = [t for t in held.values() if ledger.is_large(t)]
        assert ledger.large_reserved_tokens == sum(large_held)
        assert len(large_held) <= 1 or sum(large_held) <= ledger.large_cap_tokens
        assert set(ledger.waiting) == set(known) - set(held)
        if ledger.waiting and not held:  # with nothing held, something must be admissible
            raise AssertionError(f"stuck: {ledger.waiting} wait on an empty budget")
    for rid in list(known):  # every completion, abort or disconnect releases
        ledger.release(rid)
    assert ledger.reserved_tokens == 0 and ledger.waiting == ()


def test_resize_keeps_what_is_held_and_admits_by_the_new_budget() -> None:
    ledger = KvLedger(100)
    assert ledger.request("a", 80) and not ledger.request("b", 50)
    ledger.resize(200)
    assert ledger.admit_waiting() == ["b"]
    ledger.resize(60)  # smaller than what is held: nothing new until enough is released
    assert not ledger.request("c", 11)
    assert ledger.release("a") == []  # 50 held of 60: c (11) fits only once b is gone too
    assert ledger.reserved_tokens == 50 and ledger.waiting == ("c",)
    assert ledger.release("b") == ["c"]
