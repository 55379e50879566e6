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


def test_long_request_is_not_bypassed_forever() -> None:
    ledger = KvLedger(100, max_bypass=2)
    assert ledger.request("hold", 50)
    assert not ledger.request("long", 95)
    assert ledger.request("s1", 10)  # bypass 1
    assert ledger.request("s2", 10)  # bypass 2
    assert not ledger.request("s3", 10)  # the long one now blocks the line
    for rid in ("hold", "s1", "s2"):
        ledger.release(rid)
    assert ledger.holds("long") and ledger.waiting == ("s3",)


def test_cancel_while_waiting() -> None:
    ledger = KvLedger(10)
    ledger.request("a", 10)
    ledger.request("b", 5)
    ledger.release("b")
    assert ledger.waiting == () and ledger.reserved_tokens == 10


ops = st.lists(st.tuples(st.sampled_from(["req", "rel"]), st.integers(0, 15),
                         st.integers(1, 120)), max_size=80)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(1, 200), bypass=st.integers(0, 4), script=ops)
def test_ledger_never_overcommits_and_never_leaks(capacity: int, bypass: int,
                                                  script: list[tuple[str, int, int]]) -> None:
    ledger = KvLedger(capacity, max_bypass=bypass)
    known: set[str] = set()
    for op, ident, tokens in script:
        rid = f"r{ident}"
        if op == "req" and rid not in known:
            try:
                ledger.request(rid, tokens)
                known.add(rid)
            except AdmissionError:
                assert tokens > capacity
        elif op == "rel":
            ledger.release(rid)
            known.discard(rid)
        assert 0 <= ledger.reserved_tokens <= capacity
        assert set(ledger.waiting).isdisjoint(r for r in known if ledger.holds(r))
    for rid in list(known):  # every completion, abort or disconnect releases
        ledger.release(rid)
    assert ledger.reserved_tokens == 0 and ledger.waiting == ()
