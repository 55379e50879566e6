"""Per-key rate limits: requests per minute and tokens per minute as token buckets.

Pure (no Ray, no HTTP, no clock of its own: every call takes `now` in seconds). A bucket holds
up to a minute's allowance and refills continuously, so a key may burst its whole minute at once
and then gets a steady rate; a refused request takes nothing. Requests are taken up front.
Tokens are charged after the request with the usage it really had (the engine counts it): a
request is admitted while the key's token bucket is not empty, and a large one may leave it in
debt, which the refill pays back before the next request is admitted.

The numbers for OpenAI's headers come with every check: `x-ratelimit-limit-*` (per minute),
`x-ratelimit-remaining-*` (what is left now) and `x-ratelimit-reset-*` (until the bucket is full
again, in OpenAI's duration format, e.g. `1s`, `6m0s`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MINUTE_S = 60.0


@dataclass
class Bucket:
    per_minute: float
    level: float = field(init=False)
    stamp: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.level = self.per_minute

    @property
    def per_s(self) -> float:
        return self.per_minute / MINUTE_S

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.per_minute, self.level + (now - self.stamp) * self.per_s)
            self.stamp = now

    def take(self, amount: float, now: float) -> bool:
        self.refill(now)
        if amount > self.level:
            return False
        self.level -= amount
        return True

    def charge(self, amount: float, now: float) -> None:
        """Takes `amount` even beyond what is there (the bucket goes into debt)."""
        self.refill(now)
        self.level -= amount

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` is available (inf when it exceeds the whole allowance)."""
        self.refill(now)
        if amount > self.per_minute:
            return math.inf
        return max(0.0, (amount - self.level) / self.per_s)

    def reset_s(self, now: float) -> float:
        self.refill(now)
        return (self.per_minute - self.level) / self.per_s


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    kind: str  # "requests" or "tokens"
    retry_after_s: float  # 0 when allowed; inf when it can never be allowed
    headers: dict[str, str]


def duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1s`, `6m0s`, `1h2m3s`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class RateLimiter:
    """Buckets per key name. `share` scales every limit: with N ingress replicas each enforces
    1/N of a key's limits (Serve spreads requests evenly), so no shared state is on the path."""

    def __init__(self, share: float = 1.0) -> None:
        if not 0 < share <= 1:
            raise ValueError("share must be in (0, 1]")
        self.share = share
        self._buckets: dict[tuple[str, str], Bucket] = {}

    def _bucket(self, key: str, kind: str, per_minute: int, now: float) -> Bucket:
        scaled = per_minute * self.share
        bucket = self._buckets.get((key, kind))
        if bucket is None or bucket.per_minute != scaled:  # new key, or its limit changed
            bucket = self._buckets[(key, kind)] = Bucket(scaled, stamp=now)
        return bucket

    def check(self, key: str, kind: str, per_minute: int | None, amount: float,
              now: float) -> Verdict:
        """Take `amount` from the key's `kind` bucket if it is there."""
        if per_minute is None:
            return Verdict(True, kind, 0.0, {})
        bucket = self._bucket(key, kind, per_minute, now)
        allowed = bucket.take(amount, now)
        retry = 0.0 if allowed else bucket.wait_s(amount, now)
        return Verdict(allowed, kind, retry, self._headers(bucket, kind, now))

    @staticmethod
    def _headers(bucket: Bucket, kind: str, now: float) -> dict[str, str]:
        return {
            f"x-ratelimit-limit-{kind}": str(int(bucket.per_minute)),
            f"x-ratelimit-remaining-{kind}": str(max(0, int(bucket.level))),
            f"x-ratelimit-reset-{kind}": duration(bucket.reset_s(now)),
        }

    def request(self, key: str, limits: Limits, now: float) -> Verdict:
        return self.check(key, "requests", limits.requests_per_minute, 1, now)

    def tokens_left(self, key: str, limits: Limits, now: float) -> Verdict:
        """Whether the key has tokens left this minute (nothing is taken: the request is
        charged its real usage afterwards, with `charge_tokens`)."""
        per_minute = limits.tokens_per_minute
        if per_minute is None:
            return Verdict(True, "tokens", 0.0, {})
        bucket = self._bucket(key, "tokens", per_minute, now)
        bucket.refill(now)
        allowed = bucket.level >= 1  # at least one token left
        retry = 0.0 if allowed else (1 - bucket.level) / bucket.per_s
        return Verdict(allowed, "tokens", retry, self._headers(bucket, "tokens", now))

    def charge_tokens(self, key: str, limits: Limits, tokens: int, now: float) -> None:
        if limits.tokens_per_minute is not None:
            self._bucket(key, "tokens", limits.tokens_per_minute, now).charge(tokens, now)

    def forget(self, keep: set[str]) -> None:
        """Drop the buckets of keys no longer configured."""
        for name_kind in [k for k in self._buckets if k[0] not in keep]:
            del self._buckets[name_kind]
