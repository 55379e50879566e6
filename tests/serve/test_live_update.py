"""Live config updates (Ray Serve, fake engine): a second `serve deploy` that changes routing
rules, API keys and limits in the ingress deployment's `user_config` takes effect without
restarting any model replica; one that changes a model's engine settings (its deployment's
`user_config`) restarts that model's engine alone."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from serve_app.auth import hash_key
from tests.conftest import model_handle, wait_until

pytestmark = pytest.mark.serve

ARGS: dict[str, Any] = {
    "default_model": "chat",
    "routing": {"rules": [{"name": "code", "when": {"code": True}, "model": "code"}]},
    "models": [
        {"name": "chat", "model": "fake", "pinned": True,
         "engine_kwargs": {"tokens_per_s": 2000, "kv_capacity_tokens": 1000}},
        {"name": "code", "model": "fake", "pinned": True},
    ],
}
KEY = "rh-live-key"
CODE = [{"role": "user", "content": "Fix it:\n```python\nprint(1 +)\n```"}]


def ingress(**user_config: Any) -> list[dict[str, Any]]:
    return [{"name": "ingress", "user_config": user_config}]


def post(base_url: str, max_tokens: int, messages: list[dict[str, str]] | None = None,
         key: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{base_url}/v1/chat/completions", headers=headers, timeout=30, json={
        "model": "auto", "max_tokens": max_tokens,
        "messages": messages or [{"role": "user", "content": "hello"}]})


def stats(model: str) -> dict[str, Any]:
    return dict(model_handle(model).stats.remote().result(timeout_s=120))


def instances() -> dict[str, str]:
    return {m: stats(m)["instance"] for m in ("chat", "code")}


def test_routing_keys_and_limits_change_without_restarting_models(deploy: Any) -> None:
    base_url = deploy(ARGS, deployments=ingress(limits={"chat": {"max_output_tokens": 50}}))
    before = instances()
    assert post(base_url, 4, CODE).headers["x-roundhouse-model"] == "code"
    capped = post(base_url, 60)
    assert capped.status_code == 400 and capped.json()["error"]["code"] == "max_tokens_exceeded"

    deploy(ARGS, fresh=False, deployments=ingress(
        routing={"rules": []},
        auth={"keys": [{"name": "live", "sha256": hash_key(KEY)}]},
        limits={"chat": {"max_output_tokens": 80, "kv_budget_fraction": 0.5}}))
    wait_until(lambda: post(base_url, 4).status_code == 401, 60, "the new keys to apply")
    routed = post(base_url, 4, CODE, key=KEY)
    assert routed.status_code == 200, routed.text
    assert routed.headers["x-roundhouse-model"] == "chat"  # the code rule is gone
    assert routed.headers["x-roundhouse-route"] == "default"
    assert post(base_url, 70, key=KEY).status_code == 200  # the raised cap
    # The replica took the new limits with that request: half of the fake's 1000 KV tokens.
    assert model_handle("chat").stats.remote().result()["kv_budget_tokens"] == 500
    assert instances() == before, "a model replica restarted"



def same_engine(before: dict[str, Any], after: dict[str, Any]) -> bool:
    keys = ("instance", "replica", "engine_restarts")
    return all(before[k] == after[k] for k in keys)


def test_engine_settings_restart_only_that_models_engine(deploy: Any) -> None:
    base_url = deploy(ARGS)
    chat, code = stats("chat"), stats("code")
    assert chat["kv_capacity_tokens"] == 1000

    deploy(ARGS, fresh=False, deployments=[
        {"name": "model-chat", "user_config": {"engine_kwargs": {"kv_capacity_tokens": 3000}}}])
    new_chat = wait_until(lambda: (s := stats("chat"))["engine_restarts"] == 1 and s, 120,
                          "chat's engine to restart with the new settings")
    assert new_chat["kv_capacity_tokens"] == new_chat["kv_budget_tokens"] == 3000
    assert new_chat["instance"] != chat["instance"]  # a new engine...
    assert new_chat["replica"] == chat["replica"]  # ...in the same replica
    assert same_engine(code, stats("code")), "the code model was restarted"
    assert post(base_url, 4).status_code == 200
    routed = post(base_url, 4, CODE)
    assert routed.status_code == 200 and routed.headers["x-roundhouse-model"] == "code"

    deploy(ARGS, fresh=False)  # the entry removed: back to the args' settings
    back = wait_until(lambda: (s := stats("chat"))["engine_restarts"] == 2 and s, 120,
                      "chat's engine to restart with the args' settings")
    assert back["kv_capacity_tokens"] == 1000 and back["replica"] == chat["replica"]
    assert same_engine(code, stats("code")), "the code model was restarted"
