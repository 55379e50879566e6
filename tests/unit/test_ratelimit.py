"""serve_app/policy/ratelimit.py: token buckets per key, OpenAI's headers."""

from __future__ import annotations

import copy
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app.policy.ratelimit import Limits, RateLimiter, duration


def test_requests_per_minute_burst_then_refill() -> None:
    limiter = RateLimiter()
    limits = Limits(requests_per_minute=3)
    assert all(limiter.request("k", limits, 0.0).allowed for _ in range(3))
    refused = limiter.request("k", limits, 0.0)
    assert not refused.allowed and refused.kind == "requests"
    assert math.isclose(refused.retry_after_s, 20.0)  # one request every 20 s
    assert refused.headers == {"x-ratelimit-limit-requests": "3",
                               "x-ratelimit-remaining-requests": "0",
                               "x-ratelimit-reset-requests": "1m0s"}
    assert not limiter.request("k", limits, 19.9).allowed
    assert limiter.request("k", limits, 20.0).allowed
    assert limiter.request("other", limits, 20.0).allowed  # keys do not share buckets


def test_tokens_per_minute_are_charged_with_the_usage_afterwards() -> None:
    limiter = RateLimiter()
    limits = Limits(tokens_per_minute=1000)
    first = limiter.tokens_left("k", limits, 0.0)
    assert first.allowed and first.headers["x-ratelimit-remaining-tokens"] == "1000"
    limiter.charge_tokens("k", limits, 600, 0.0)
    assert limiter.tokens_left("k", limits, 0.0).headers[
        "x-ratelimit-remaining-tokens"] == "400"
    # A large request may leave the key in debt: nothing more until the refill pays it back.
    limiter.charge_tokens("k", limits, 1000, 0.0)
    refused = limiter.tokens_left("k", limits, 0.0)
    assert not refused.allowed and refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert math.isclose(refused.retry_after_s, 601 / (1000 / 60))
    assert not limiter.tokens_left("k", limits, refused.retry_after_s * 0.99).allowed
    assert limiter.tokens_left("k", limits, refused.retry_after_s + 1e-6).allowed
    assert limiter.tokens_left("other", limits, 0.0).allowed  # keys do not share buckets


def test_no_limit_means_no_headers() -> None:
    verdict = RateLimiter().request("k", Limits(), 0.0)
    assert verdict.allowed and verdict.headers == {}


def test_share_divides_the_limits_between_replicas() -> None:
    limiter = RateLimiter(share=0.5)
    limits = Limits(requests_per_minute=10)
    assert sum(limiter.request("k", limits, 0.0).allowed for _ in range(10)) == 5


def test_a_changed_limit_takes_effect() -> None:
    limiter = RateLimiter()
    assert limiter.request("k", Limits(requests_per_minute=1), 0.0).allowed
    assert not limiter.request("k", Limits(requests_per_minute=1), 0.0).allowed
    assert limiter.request("k", Limits(requests_per_minute=5), 0.0).allowed


def test_openai_duration_format() -> None:
    assert [duration(s) for s in (0.0201, 0.5, 1.0, 59.2, 60, 3723)] == [
        "21ms", "500ms", "1s", "1m0s", "1m0s", "1h2m3s"]


@settings(max_examples=300, deadline=None)
@given(per_minute=st.integers(1, 500),
       steps=st.lists(st.tuples(st.floats(0, 30), st.integers(1, 60)), max_size=60))
def test_never_more_than_the_allowance_over_any_stretch(
        per_minute: int, steps: list[tuple[float, int]]) -> None:
    """Tokens charged over [0, t] never exceed a full bucket plus what refilled since 0 plus
    the one request admitted last (its usage is only known afterwards), and a refusal's
    Retry-After is exactly when a request is admitted again."""
    limiter = RateLimiter()
    limits = Limits(tokens_per_minute=per_minute)
    now, taken, last = 0.0, 0, 0
    for gap, amount in steps:
        now += gap
        verdict = limiter.tokens_left("k", limits, now)
        if verdict.allowed:
            limiter.charge_tokens("k", limits, amount, now)
            taken += amount
            last = amount
        else:
            wait = verdict.retry_after_s
            assert wait != math.inf
            if wait > 1e-3:
                early = copy.deepcopy(limiter)
                assert not early.tokens_left("k", limits, now + wait * 0.99).allowed
            on_time = copy.deepcopy(limiter)
            assert on_time.tokens_left("k", limits, now + wait + 1e-6).allowed
        assert taken <= per_minute + now * per_minute / 60 + last + 1e-6
        remaining = int(verdict.headers["x-ratelimit-remaining-tokens"])
        assert 0 <= remaining <= per_minute

