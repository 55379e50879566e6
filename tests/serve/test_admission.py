"""Admission on real Ray Serve with the fake engine: output caps, context checks, KV reservations
with a bounded queue, queue and generation timeouts, release on disconnect: all in the model
replica, where the engine counts each prompt once."""

from __future__ import annotations

import concurrent.futures
import json
import threading
from typing import Any

import httpx
import pytest

from tests.conftest import model_handle, wait_until

pytestmark = pytest.mark.serve

# Fake tokens: one per word. "kv" holds 100 KV tokens; a request of 2 prompt words and
# max_tokens 40 reserves 42, so two run at once and the rest queue; one reserving over 45 is
# large, and large ones hold at most 50 together.
ARGS: dict[str, Any] = {
    "default_model": "kv",
    "models": [
        {"name": "kv", "model": "fake", "pinned": True,
         "engine_kwargs": {"tokens_per_s": 20, "max_model_len": 64, "kv_capacity_tokens": 100},
         "limits": {"max_output_tokens": 48, "max_queued_requests": 2, "queue_timeout_s": 60,
                    "request_timeout_s": 30, "large_request_tokens": 45,
                    "large_request_share": 0.5}},
        {"name": "capped", "model": "fake", "pinned": True,
         "engine_kwargs": {"tokens_per_s": 2000, "max_model_len": 64},
         "limits": {"max_output_tokens": 5, "clamp_max_tokens": True}},
        {"name": "hasty", "model": "fake", "pinned": True,
         "engine_kwargs": {"tokens_per_s": 10, "max_model_len": 256, "kv_capacity_tokens": 60},
         "limits": {"queue_timeout_s": 1, "request_timeout_s": 2}},
    ],
}


@pytest.fixture(scope="module")
def base_url(deploy: Any) -> str:
    return deploy(ARGS)


def body(model: str, max_tokens: int | None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi there"}],
                           **extra}
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    return out


def post(base_url: str, payload: dict[str, Any], timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/chat/completions", json=payload, timeout=timeout)


def stats(model: str) -> dict[str, int]:
    return dict(model_handle(model).stats.remote().result())


def test_output_cap_refuses_or_clamps(base_url: str) -> None:
    refused = post(base_url, body("kv", 49))
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert (error["param"], error["code"]) == ("max_tokens", "max_tokens_exceeded")
    assert "limit of 48" in error["message"]
    clamped = post(base_url, body("capped", 50))
    assert clamped.status_code == 200, clamped.text
    assert clamped.json()["usage"]["completion_tokens"] == 5
    default = post(base_url, body("capped", None))
    assert default.json()["usage"]["completion_tokens"] == 5  # the cap is the default


def test_context_overflow_is_400_in_openai_words(base_url: str) -> None:
    for stream in (False, True):
        resp = post(base_url, body("kv", 40, stream=stream,
                                   messages=[{"role": "user", "content": "word " * 70}]))
        assert resp.status_code == 400
        error = resp.json()["error"]
        assert error["code"] == "context_length_exceeded"
        assert "This model's maximum context length is 64 tokens" in error["message"]
        assert "70 input tokens" in error["message"]
    # A prompt that fits with max_tokens beyond the context: cut at the context's end, and
    # the KV reservation is what really runs (30 + 34), not what was asked.
    cut = post(base_url, body("kv", 40, messages=[{"role": "user", "content": "word " * 30}]))
    assert cut.status_code == 200 and cut.json()["usage"]["completion_tokens"] == 34
    # Without max_tokens the cap shrinks to what the context leaves: no error.
    fits = post(base_url, body("capped", None, messages=[{"role": "user",
                                                          "content": "word " * 62}]))
    assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] == 2


def test_requests_beyond_the_kv_budget_queue_then_429(base_url: str) -> None:
    # 2 run (84 of 100 tokens), 2 wait, the rest are refused at once.
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(post, base_url, body("kv", 40)) for _ in range(6)]
        wait_until(lambda: stats("kv")["queued_requests"] == 2, 20, "two requests to queue")
        assert stats("kv")["kv_reserved_tokens"] == 84
        results = [f.result() for f in futures]
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 200, 200, 200, 429, 429], [r.text for r in results]
    refused = [r for r in results if r.status_code == 429]
    for r in refused:
        assert r.json()["error"]["code"] == "queue_full"
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert int(r.headers["retry-after"]) >= 1
    assert all(r.json()["usage"]["completion_tokens"] == 40 for r in results
               if r.status_code == 200)
    wait_until(lambda: stats("kv")["kv_reserved_tokens"] == 0, 10, "reservations to be freed")


def test_a_long_request_is_not_starved_by_short_ones(base_url: str) -> None:
    # Ten clients keep short requests (2 + 6 tokens) in flight, holding up to 80 of the 100
    # tokens, so a long one (2 + 48, large) never fits on its own; short ones may pass it only
    # a bounded number of times, then queue behind it until it is in.
    stop = threading.Event()

    def shorts() -> list[int]:
        codes = []
        while not stop.is_set():
            codes.append(post(base_url, body("kv", 6)).status_code)
        return codes

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        workers = [pool.submit(shorts) for _ in range(10)]
        wait_until(lambda: stats("kv")["kv_reserved_tokens"] > 50, 20,
                   "short requests to hold more than half the budget")
        try:
            long = post(base_url, body("kv", 48))
        finally:
            stop.set()
        codes = [code for w in workers for code in w.result()]
    assert long.status_code == 200, long.text
    assert long.json()["usage"]["completion_tokens"] == 48
    assert codes.count(200) >= 10 and set(codes) <= {200, 429}


def test_large_requests_keep_to_their_share_and_short_ones_pass(base_url: str) -> None:
    # Two large requests (2 + 48 = 50 each): the second waits for the first (their share is
    # 50), while short ones (2 + 6) still go straight in beside them.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        longs = [pool.submit(post, base_url, body("kv", 48)) for _ in range(2)]
        wait_until(lambda: stats("kv")["queued_requests"] == 1, 20, "the second large to wait")
        assert stats("kv")["kv_reserved_large_tokens"] == 50
        short = post(base_url, body("kv", 6))
        still = stats("kv")
        results = [f.result() for f in longs]
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 6
    assert still["queued_requests"] == 1, "the short one did not pass the waiting large one"
    assert [r.status_code for r in results] == [200, 200]


def test_queue_timeout_and_generation_timeout(base_url: str) -> None:
    # hasty: 60 KV tokens, 10 tokens/s, queue timeout 1 s, request timeout 2 s.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(post, base_url, body("hasty", 50))
        wait_until(lambda: stats("hasty")["kv_reserved_tokens"] > 0, 10, "the first to run")
        waited = post(base_url, body("hasty", 50))
        assert waited.status_code == 429
        assert waited.json()["error"]["code"] == "queue_timeout"
        assert "retry-after" in waited.headers
        timed_out = slow.result()
    assert timed_out.status_code == 504
    assert timed_out.json()["error"]["code"] == "generation_timeout"
    wait_until(lambda: stats("hasty")["unfinished_requests"] == 0
               and stats("hasty")["kv_reserved_tokens"] == 0, 10,
               "the engine request to be aborted and its reservation freed")

    with httpx.stream("POST", f"{base_url}/v1/chat/completions",
                      json=body("hasty", 50, stream=True), timeout=30) as resp:
        assert resp.status_code == 200
        events = [line for line in resp.iter_lines() if line]
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "generation_timeout"
    assert events[-1] == "data: [DONE]"
    wait_until(lambda: stats("hasty")["kv_reserved_tokens"] == 0, 10, "the stream's reservation")


def test_disconnect_frees_the_reservation(base_url: str) -> None:
    with httpx.stream("POST", f"{base_url}/v1/chat/completions",
                      json=body("kv", 48, stream=True), timeout=30) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()  # kept: a dropped iterator closes the connection
        assert next(lines).startswith("data: ")
        assert stats("kv")["kv_reserved_tokens"] == 50
    wait_until(lambda: stats("kv")["kv_reserved_tokens"] == 0
               and stats("kv")["unfinished_requests"] == 0, 1.5,
               "the reservation and the engine request to go within a second")


def test_more_than_the_whole_budget_is_400(base_url: str) -> None:
    # n=3 x 40 + 2 = 122 > 100: can never fit.
    resp = post(base_url, body("kv", 40, n=3))
    assert resp.status_code == 400
    assert "KV budget is 100 tokens" in resp.json()["error"]["message"]
