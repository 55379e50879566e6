"""The memory plan checked at build time, on the shipped configs and on broken ones."""

from __future__ import annotations

from typing import Any

import pytest

from serve_app.app import (
    ConfigError,
    load_app_config,
    memory_plan_problems,
    model_deployment_options,
    parse_app_config,
)
from serve_app.config import AppConfig
from tests.conftest import REPO


def gpu_model(name: str, share: float, budget: float = 80.0, **extra: Any) -> dict[str, Any]:
    return {"name": name, "model": f"org/{name}", "memory_gib": round(share * budget, 2),
            "num_gpus": share, "engine_kwargs": {"gpu_memory_utilization": share}, **extra}


@pytest.mark.parametrize("path", ["serve_config.yaml", "configs/h100-pinned-chat.yaml",
                                  "configs/local.yaml"])
def test_shipped_configs_hold_their_memory_plan(path: str) -> None:
    config = load_app_config(REPO / path)
    assert memory_plan_problems(config) == []
    pinned = sum(m.memory_gib for m in config.models if m.pinned)
    largest = max(m.memory_gib for m in config.models if not m.pinned)
    assert pinned + largest <= config.budget_gib


def test_production_config_is_one_h100_with_the_seed_models() -> None:
    config = load_app_config(REPO / "serve_config.yaml")
    assert config.budget_gib <= 80
    names = {m.name: m for m in config.models}
    assert set(names) == {"chat", "code", "reasoning"}
    assert "8B" in names["chat"].model and "32B" in names["code"].model
    assert "70B" in names["reasoning"].model and "FP8" in names["reasoning"].model
    # The 70B at FP8 needs nearly the whole card: it cannot share it with the 8B.
    assert names["reasoning"].memory_gib + names["chat"].memory_gib > config.budget_gib
    for m in config.models:
        assert m.num_gpus * config.budget_gib == pytest.approx(m.memory_gib, abs=0.8)
        assert m.engine_kwargs["gpu_memory_utilization"] == m.num_gpus
        assert m.engine_kwargs["max_model_len"] >= 8192


def test_local_config_fits_chat_plus_one_on_demand_model() -> None:
    config = load_app_config(REPO / "configs" / "local.yaml")
    chat = config.model("chat")
    on_demand = [m for m in config.models if not m.pinned]
    assert chat.pinned and len(on_demand) == 2
    assert chat.memory_gib + on_demand[0].memory_gib <= config.budget_gib
    assert chat.memory_gib + sum(m.memory_gib for m in on_demand) > config.budget_gib


def test_pinned_plus_largest_on_demand_over_budget_is_refused_with_arithmetic() -> None:
    args = {"residency": {"gpu_memory_gib": 80.0}, "models": [
        gpu_model("chat", 0.25, pinned=True), gpu_model("reasoning", 0.9)]}
    with pytest.raises(ConfigError) as err:
        parse_app_config(args)
    message = str(err.value)
    assert "chat 20.0 GiB + reasoning 72.0 GiB = 92.0 GiB > 80.0 GiB" in message


def test_num_gpus_must_agree_with_memory_and_vllm_share() -> None:
    bad_share = {"residency": {"gpu_memory_gib": 80.0}, "models": [
        {**gpu_model("chat", 0.25), "num_gpus": 0.5,
         "engine_kwargs": {"gpu_memory_utilization": 0.5}}]}
    with pytest.raises(ConfigError, match=r"num_gpus 0.5 x 80.0 GiB = 40.0 GiB.*set num_gpus "
                                          r"to 0.250"):
        parse_app_config(bad_share)
    no_util = {"residency": {"gpu_memory_gib": 80.0}, "models": [
        {**gpu_model("chat", 0.25), "engine_kwargs": {}}]}
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        parse_app_config(no_util)
    no_budget = {"models": [gpu_model("chat", 0.25)]}
    with pytest.raises(ConfigError, match="gpu_memory_gib"):
        parse_app_config(no_budget)


def test_every_model_deployment_starts_cold_unless_pinned_or_preloaded() -> None:
    config = AppConfig.model_validate({"models": [
        {"name": "chat", "model": "fake", "pinned": True},
        {"name": "warm", "model": "fake", "preload": True},
        {"name": "code", "model": "fake"}]})
    options = {m.name: model_deployment_options(m) for m in config.models}
    assert {n: o["autoscaling_config"]["initial_replicas"] for n, o in options.items()} == {
        "chat": 1, "warm": 1, "code": 0}
    for o in options.values():
        auto = o["autoscaling_config"]
        assert (auto["min_replicas"], auto["max_replicas"]) == (0, 1)
        assert auto["upscale_delay_s"] == auto["downscale_delay_s"] == 0
        assert "num_replicas" not in o


def test_cpu_models_ask_ray_for_their_memory_when_the_cluster_offers_it() -> None:
    config = AppConfig.model_validate({"models": [
        {"name": "chat", "model": "fake", "memory_gib": 3.0}]})
    with_resource = model_deployment_options(config.models[0], memory_resource=True)
    assert with_resource["ray_actor_options"]["resources"] == {"roundhouse_memory_mib": 3072}
    assert "resources" not in model_deployment_options(config.models[0])["ray_actor_options"]
