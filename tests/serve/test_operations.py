"""The operators' view on real Ray Serve with the fake engine: Prometheus metrics through Ray's
metrics endpoint, `GET /v1/status` and `roundhouse status`, JSON request logs without prompts
or keys."""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any

import httpx
import pytest

from serve_app.auth import hash_key
from serve_app.cli import main
from tests.conftest import METRICS_PORT, wait_until

pytestmark = pytest.mark.serve

ADMIN = "rh-ops-admin-key"
SECRET_PROMPT = "my-secret-prompt-7f3a"
ARGS: dict[str, Any] = {
    "default_model": "chat",
    "models": [
        {"name": "chat", "model": "fake", "pinned": True,
         "engine_kwargs": {"tokens_per_s": 2000, "kv_capacity_tokens": 1000}},
        {"name": "code", "model": "fake", "memory_gib": 1.0},
    ],
    "auth": {"keys": [{"name": "ops", "sha256": hash_key(ADMIN), "admin": True,
                       "requests_per_minute": 1000}]},
}
AUTH = {"authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def base_url(deploy: Any) -> str:
    url: str = deploy(ARGS, logging_config={"encoding": "JSON"})
    for stream in (False, True):
        resp = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=30, json={
            "model": "chat", "max_tokens": 4, "stream": stream,
            "messages": [{"role": "user", "content": SECRET_PROMPT}]})
        assert resp.status_code == 200
    assert httpx.post(f"{url}/v1/chat/completions", timeout=10, json={}).status_code == 401
    return url


def scrape() -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    except httpx.HTTPError:
        return ""


def values(text: str, name: str, **labels: str) -> list[float]:
    """Every sample of `name` whose labels include `labels` (one per replica or process)."""
    found = []
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            found.append(float(match.group(2)))
    return found


def test_metrics_reach_rays_prometheus_endpoint(base_url: str) -> None:
    # Earlier apps of this session left series of their own: look at this app's replicas.
    status = httpx.get(f"{base_url}/v1/status", headers=AUTH, timeout=10).json()
    ingress, chat = status["ingress_replica"], status["models"]["chat"]["replica"]
    expected = {  # (metric, labels): value
        ("ray_roundhouse_requests_total", (("model", "chat"), ("rule", "explicit"),
                                           ("status", "200"), ("replica", ingress))): 2,
        ("ray_roundhouse_output_tokens_total", (("model", "chat"), ("replica", ingress))): 8,
        ("ray_roundhouse_refusals_total", (("reason", "missing_api_key"),
                                           ("replica", ingress))): 1,
        ("ray_roundhouse_ttft_seconds_count", (("model", "chat"), ("replica", ingress))): 1,
        ("ray_roundhouse_request_latency_seconds_count", (("model", "chat"), ("stream", "true"),
                                                          ("replica", ingress))): 1,
        ("ray_roundhouse_kv_budget_tokens", (("model", "chat"), ("replica", chat))): 1000,
    }

    def arrived() -> str | None:
        # Each process (ingress, model replica, controller) reports on its own schedule.
        text = scrape()
        done = (all(values(text, name, **dict(labels)) for (name, labels) in expected)
                # Controllers of earlier apps wrote the same series: wait for this one's.
                and 1 in values(text, "ray_roundhouse_model_state", model="code", state="cold")
                and 1 in values(text, "ray_roundhouse_model_state", model="chat",
                                state="active"))
        return text if done else None

    text = wait_until(arrived, 60, "Roundhouse's metrics on Ray's metrics endpoint",
                      interval_s=1)
    for (name, labels), want in expected.items():
        assert values(text, name, **dict(labels)) == [want], name
    # The controller is a plain actor (no replica label); its series are per model.
    assert sum(values(text, "ray_roundhouse_model_loads_total", model="chat")) >= 1
    assert sum(values(text, "ray_roundhouse_model_load_seconds_count", model="chat")) >= 1


def test_status_endpoint_and_cli(base_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    status = httpx.get(f"{base_url}/v1/status", headers=AUTH, timeout=10).json()
    chat, code = status["models"]["chat"], status["models"]["code"]
    assert chat["state"] == "active" and chat["running_replicas"] == 1
    assert chat["kv_budget_tokens"] == 1000 and chat["in_flight"] == 0
    assert chat["kv_reserved_tokens"] == 0 and chat["queued_requests"] == 0
    assert chat["last_decision"]["message"].startswith("ready chat: loaded in")
    assert code["state"] == "cold" and "in_flight" not in code
    assert [x["model"] for x in status["recent_loads"]] == ["chat"]
    assert main(["status", "--url", base_url, "--api-key", ADMIN]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^chat\s+active \(pinned\)\s+1\.0 GiB\s+1/1", table, re.M), table
    assert re.search(r"^code\s+cold\s+1\.0 GiB\s+0/0", table, re.M), table
    assert "recent loads: chat ready in" in table
    assert main(["status", "--url", base_url]) == 1  # no key: 401, said plainly
    assert "401" in capsys.readouterr().err


def serve_logs() -> list[str]:
    import ray

    logs = os.path.join(ray._private.worker.global_worker.node.get_logs_dir_path(), "serve")
    return sorted(glob.glob(os.path.join(logs, "*.log")))


def test_json_request_logs_carry_the_fields_and_no_prompt_or_key(base_url: str) -> None:
    def records() -> list[dict[str, Any]] | None:
        found = []
        for path in serve_logs():
            if "ingress" not in path:
                continue
            for line in open(path, encoding="utf-8", errors="replace"):
                if line.startswith("{") and '"status_code"' in line:
                    found.append(json.loads(line))
        return found if len(found) >= 3 else None

    found = wait_until(records, 20, "JSON request lines in the ingress log")
    ok = [r for r in found if r.get("status_code") == 200 and r.get("model") == "chat"]
    assert {r["stream"] for r in ok} == {True, False}
    for record in ok:
        assert record["rule"] == "explicit" and record["key"] == "ops"
        assert record["request_id"] and record["path"] == "/v1/chat/completions"
        assert ("ttft_ms" if record["stream"] else "duration_ms") in record
    for path in serve_logs():
        text = open(path, encoding="utf-8", errors="replace").read()
        assert SECRET_PROMPT not in text, path
        assert ADMIN not in text, path  # (Serve logs the app args: hashes, not keys)
