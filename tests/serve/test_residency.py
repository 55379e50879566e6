"""The residency controller on real Ray Serve with the fake engine: loads, evictions, drains,
failures and timeouts, seen through HTTP, Serve's status API and the controller's decisions."""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any

import httpx
import pytest

from tests.conftest import controller_status, replicas, wait_until

pytestmark = pytest.mark.serve

FAST = {"load_s": 0.5, "tokens_per_s": 400}


def fake(name: str, memory_gib: float = 2.0, **extra: Any) -> dict[str, Any]:
    fake_cfg = {**FAST, **extra.pop("fake", {})}
    return {"name": name, "model": "fake", "memory_gib": memory_gib, "engine_kwargs": fake_cfg, **extra}


def args(*models: dict[str, Any], **residency: Any) -> dict[str, Any]:
    return {"default_model": models[0]["name"], "models": list(models),
            "residency": {"gpu_memory_gib": 4.0, "failure_backoff_s": 30, **residency}}


def ask(base_url: str, model: str, max_tokens: int = 4, timeout: float = 60,
        **extra: Any) -> httpx.Response:
    body = {"model": model, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hello"}], **extra}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=timeout)


def decisions() -> list[str]:
    return [d["message"] for d in controller_status()["decisions"]]


def count(prefix: str) -> int:
    return sum(1 for d in decisions() if d.startswith(prefix))


def index_of(prefix: str) -> int:
    found = [i for i, d in enumerate(decisions()) if d.startswith(prefix)]
    assert found, f"no decision starting with {prefix!r} in {decisions()}"
    return found[0]


def state(model: str) -> str:
    return str(controller_status()["models"][model]["state"])


def test_cold_models_have_zero_replicas_and_a_burst_causes_one_load(deploy: Any) -> None:
    base_url = deploy(args(fake("chat", pinned=True), fake("code", fake={"load_s": 2.0})))
    assert replicas("chat") == 1
    assert replicas("code") == 0 and state("code") == "cold"
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: ask(base_url, "code"), range(12)))
    assert [r.status_code for r in results] == [200] * 12
    assert all(r.headers["x-roundhouse-model"] == "code" for r in results)
    assert count("load code:") == 1
    assert replicas("code") == 1 and state("code") == "active"


def test_least_recently_used_is_evicted_and_pinned_never(deploy: Any) -> None:
    # Budget 6: pinned chat (2) + two of the three on-demand models (2 each).
    base_url = deploy(args(fake("chat", pinned=True), fake("a"), fake("b"), fake("c"),
                           gpu_memory_gib=6.0))
    for model in ("a", "b", "a"):  # b is now the least recently used
        assert ask(base_url, model).status_code == 200
    assert ask(base_url, "c").status_code == 200
    eviction = decisions()[index_of("evict ")]
    assert eviction.startswith("evict b: least recently used, c needs 2.0 GiB, free 0.0 GiB")
    wait_until(lambda: replicas("b") == 0, 30, "b to be stopped")
    assert replicas("a") == 1 and replicas("c") == 1 and replicas("chat") == 1
    assert index_of("stop b:") < index_of("load c:")
    held = controller_status()["held_gib"]
    assert held <= 6.0


def test_eviction_drains_in_flight_requests_before_stopping(deploy: Any) -> None:
    base_url = deploy(args(fake("chat", pinned=True), fake("code", fake={"tokens_per_s": 40}),
                           fake("reasoning"), drain_timeout_s=60))
    assert ask(base_url, "code").status_code == 200
    body = {"model": "code", "max_tokens": 120, "stream": True,
            "messages": [{"role": "user", "content": "long answer please"}]}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body,
                      timeout=120) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            other = pool.submit(ask, base_url, "reasoning", 4, 120)
            wait_until(lambda: state("code") == "draining", 20, "code to start draining")
            # Draining: code refuses new work and is not sent any; reasoning waits for memory.
            assert state("reasoning") == "cold"
            rest = [x for x in lines if x]
            assert rest[-1] == "data: [DONE]"
            chunks = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            assert other.result().status_code == 200
    assert index_of("evict code:") < index_of("stop code:") < index_of("load reasoning:")
    wait_until(lambda: replicas("code") == 0, 30, "code to be stopped")


def test_a_failing_model_gets_503_and_the_others_keep_serving(deploy: Any) -> None:
    base_url = deploy(args(fake("chat", pinned=True),
                           fake("broken", fake={"fail_load": "weights file is corrupt"})))
    resp = ask(base_url, "broken")
    assert resp.status_code == 503
    error = resp.json()["error"]
    assert "broken" in error["message"] and "weights file is corrupt" in error["message"]
    assert error["code"] == "model_unavailable"
    assert 1 <= int(resp.headers["retry-after"]) <= 30
    assert ask(base_url, "chat").status_code == 200
    # During the backoff the model is not retried: the answer is immediate and the same.
    again = ask(base_url, "broken", timeout=5)
    assert again.status_code == 503 and "corrupt" in again.json()["error"]["message"]
    assert count("failed broken:") == 1
    assert state("broken") == "failed"
    wait_until(lambda: replicas("broken") == 0 and controller_status()["models"]["broken"][
        "desired_replicas"] == 0, 30, "the failed model to be scaled to 0")
    assert ask(base_url, "chat").status_code == 200


def test_waiting_is_bounded_in_time_and_number(deploy: Any) -> None:
    base_url = deploy(args(fake("chat", pinned=True), fake("slow", fake={"load_s": 8.0}),
                           load_timeout_s=2, max_waiting_requests=2))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: ask(base_url, "slow"), range(4)))
    statuses = sorted(r.status_code for r in results)
    assert statuses == [503] * 4
    messages = [r.json()["error"]["message"] for r in results]
    assert sum("already waiting" in m for m in messages) == 2, messages
    assert sum("not ready after 2 s" in m for m in messages) == 2, messages
    assert all("retry-after" in r.headers for r in results)
    # The load went on regardless; once done, the model serves.
    wait_until(lambda: state("slow") == "active", 30, "the slow model to finish loading")
    assert ask(base_url, "slow").status_code == 200
    assert count("load slow:") == 1


def test_idle_on_demand_models_are_stopped(deploy: Any) -> None:
    base_url = deploy(args(fake("chat", pinned=True), fake("code"), idle_timeout_s=2))
    assert ask(base_url, "code").status_code == 200
    assert replicas("code") == 1
    wait_until(lambda: replicas("code") == 0 and state("code") == "cold", 30,
               "the idle model to be stopped")
    assert any(d.startswith("stop code: idle for") for d in decisions())
    assert replicas("chat") == 1  # pinned models never go idle
    assert ask(base_url, "code").status_code == 200  # and it comes back on demand


def test_a_replica_dying_mid_request_gives_a_clear_error_and_reloads(deploy: Any) -> None:
    import ray

    base_url = deploy(args(fake("chat", pinned=True), fake("code", fake={"tokens_per_s": 20})))
    assert ask(base_url, "code").status_code == 200
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(ask, base_url, "code", 400, 60)
        wait_until(lambda: _code_replica() is not None, 10, "the code replica")
        wait_until(lambda: ray.get(_code_replica().get_num_ongoing_requests.remote()) >= 1,
                   10, "the request to reach the replica")
        ray.kill(_code_replica(), no_restart=True)
        resp = pending.result()
    assert resp.status_code >= 500 and resp.status_code != 500, resp.text
    assert "error" in resp.json()
    assert ask(base_url, "chat").status_code == 200
    wait_until(lambda: ask(base_url, "code", timeout=60).status_code == 200, 90,
               "code to be served again")


def _code_replica() -> Any:
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "model-code" in actor["name"] and actor["name"].startswith("SERVE_REPLICA"):
            try:
                return ray.get_actor(actor["name"], namespace=actor["namespace"])
            except ValueError:
                return None
    return None
