"""A model deployment's new engine settings restart only that model's vLLM engine. Runs after
the other e2e modules on the shared app (it leaves chat with a small KV cache)."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.conftest import model_handle, replicas, wait_until
from tests.e2e.conftest import app_args

pytestmark = pytest.mark.e2e


def test_new_engine_settings_restart_only_that_models_vllm_engine(
        deploy: Any, client: openai.OpenAI) -> None:
    def stats(model: str) -> dict[str, Any]:
        return dict(model_handle(model).stats.remote().result(timeout_s=300))

    others = [m for m in ("code", "reasoning") if replicas(m)]
    if not others:  # run alone: bring one up
        client.completions.create(model="code", prompt="def f():", max_tokens=2)
        others = ["code"]
    before = {m: stats(m) for m in ["chat", *others]}
    # kv_cache_memory_bytes counts only without VLLM_CPU_KVCACHE_SPACE (1 GiB in the config):
    # a new engine argument and an environment variable removed, in one update.
    deploy(app_args(), fresh=False, deployments=[{"name": "model-chat", "user_config": {
        "engine_kwargs": {"kv_cache_memory_bytes": 256 * 1024 * 1024},
        "env": {"VLLM_CPU_KVCACHE_SPACE": None}}}])
    chat = wait_until(lambda: (s := stats("chat"))["engine_restarts"] == 1 and s, 300,
                      "chat's vLLM engine to restart with the new settings")
    assert chat["replica"] == before["chat"]["replica"]
    assert chat["instance"] != before["chat"]["instance"]
    # 256 MiB of KV cache instead of the config's 1 GiB.
    assert chat["kv_capacity_tokens"] < before["chat"]["kv_capacity_tokens"] / 3
    for m in others:
        now = stats(m)
        assert (now["instance"], now["engine_restarts"]) == (before[m]["instance"], 0), m
    resp = client.chat.completions.create(model="chat", max_tokens=4,
                                          messages=[{"role": "user", "content": "Hello!"}])
    assert resp.choices[0].message.content
