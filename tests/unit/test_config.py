from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from serve_app.app import ConfigError, load_app_config, model_deployment_options, parse_app_config
from serve_app.config import AppConfig, deployment_name
from tests.conftest import REPO


def args(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"models": [{"name": "chat", "model": "/m/chat"},
                                       {"name": "code", "model": "/m/code"}]}
    base.update(over)
    return base


def test_local_config_has_the_three_roles_on_cpu() -> None:
    config = load_app_config(REPO / "configs" / "local.yaml")
    assert [m.name for m in config.models] == ["chat", "code", "reasoning"]
    assert config.default == "chat"
    for m in config.models:
        assert m.num_gpus == 0
        assert m.engine_kwargs["enforce_eager"] is True
        assert m.name in deployment_name(m.name)


def test_production_config_parses() -> None:
    config = load_app_config(REPO / "serve_config.yaml")
    assert {m.name for m in config.models} == {"chat", "code", "reasoning"}
    assert all(0 < m.num_gpus <= 1 for m in config.models)


def test_default_model_defaults_to_first() -> None:
    assert AppConfig.model_validate(args()).default == "chat"


@pytest.mark.parametrize("bad,needle", [
    (args(colour="red"), "colour"),
    (args(models=[{"name": "chat", "model": "x", "max_tokenz": 5}]), "max_tokenz"),
    (args(models=[]), "models"),
    (args(default_model="vision"), "vision"),
    (args(models=[{"name": "chat", "model": "a"}, {"name": "chat", "model": "b"}]), "chat"),
    (args(models=[{"name": "chat", "model": "a", "aliases": ["auto"]}]), "auto"),
    (args(models=[{"name": "Bad Name!", "model": "a"}]), "name"),
    (args(models=[{"name": "chat"}]), "model"),
    (args(models=[{"name": "chat", "model": "a", "num_gpus": 1.5}]), "num_gpus"),
    (args(ingress={"max_body_bytes": 10}), "max_body_bytes"),
])
def test_invalid_configs_are_refused_with_the_culprit_named(bad: dict[str, Any],
                                                            needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_app_config(bad)
    assert needle in str(info.value)


def test_unknown_engine_kwargs_are_refused() -> None:
    pytest.importorskip("vllm")
    bad = args(models=[{"name": "chat", "model": "a", "engine_kwargs": {"max_model_length": 9}}])
    with pytest.raises(ConfigError, match="max_model_length"):
        parse_app_config(bad)


@pytest.mark.parametrize(("openai", "culprit"), [
    ({"tool_call_parser": "no_such_parser"}, "tool_call_parser 'no_such_parser' is not one"),
    ({"reasoning_parser": "no_such_parser"}, "reasoning_parser 'no_such_parser' is not one"),
    ({"structured_outputs_backend": "magic"}, "structured_outputs_backend 'magic'"),
    ({"chat_template": "/no/such/template.jinja"}, "chat_template"),
    ({"frontend_kwargs": {"port": 9000}}, "frontend_kwargs.port: not a serving setting"),
    ({"frontend_kwargs": {"tool_call_parser": "hermes"}}, "set openai.tool_call_parser"),
    ({"enable_auto_tool_choice": True}, "needs tool_call_parser"),
])
def test_openai_serving_settings_are_checked_against_vllm(openai: dict[str, Any],
                                                          culprit: str) -> None:
    pytest.importorskip("vllm")
    bad = args(models=[{"name": "chat", "model": "a", "openai": openai}])
    with pytest.raises(ConfigError, match=culprit):
        parse_app_config(bad)


def test_shipped_configs_name_the_right_parsers() -> None:
    local = load_app_config(REPO / "configs" / "local.yaml")
    assert all(m.openai.tool_call_parser == "hermes" and m.openai.enable_auto_tool_choice
               for m in local.models)
    for path in (REPO / "serve_config.yaml", REPO / "configs" / "h100-pinned-chat.yaml"):
        models = {m.name: m.openai for m in load_app_config(path).models}
        assert models["chat"].tool_call_parser == "llama3_json"
        assert models["code"].tool_call_parser == "hermes"
    reasoning = load_app_config(REPO / "serve_config.yaml").model("reasoning")
    assert "R1" in reasoning.model and reasoning.openai.reasoning_parser == "deepseek_r1"
    pinned = load_app_config(REPO / "configs" / "h100-pinned-chat.yaml").model("reasoning")
    assert "Llama-3.1" in pinned.model and pinned.openai.tool_call_parser == "llama3_json"


def test_aliases_resolve_to_their_model() -> None:
    config = AppConfig.model_validate(
        args(models=[{"name": "chat", "model": "a", "aliases": ["gpt-4o-mini"]}]))
    assert config.lookup() == {"chat": "chat", "gpt-4o-mini": "chat"}


def test_deployment_options_carry_env_and_fractional_gpu() -> None:
    config = AppConfig.model_validate(args(models=[{
        "name": "code", "model": "a", "num_gpus": 0.4, "env": {"X": "1"}}]))
    opts = model_deployment_options(config.models[0])
    assert opts["name"] == "model-code"
    assert opts["ray_actor_options"]["num_gpus"] == 0.4
    assert opts["ray_actor_options"]["num_cpus"] == 0
    assert opts["ray_actor_options"]["runtime_env"] == {"env_vars": {"X": "1"}}


def test_live_overrides_replace_routing_and_keys_and_merge_limits(tmp_path: Path) -> None:
    from serve_app.config import LiveConfig, apply_live

    base = AppConfig.model_validate({
        "models": [{"name": "chat", "model": "fake",
                    "limits": {"max_output_tokens": 100, "queue_timeout_s": 5}},
                   {"name": "code", "model": "fake"}],
        "routing": {"rules": [{"name": "code", "when": {"code": True}, "model": "code"}]}})
    live = LiveConfig.model_validate({"routing": {"rules": []}, "default_model": "code",
                                      "limits": {"chat": {"max_output_tokens": 50}}})
    config = apply_live(base, live)
    assert config.routing.rules == [] and config.default == "code"
    assert config.model("chat").limits.max_output_tokens == 50
    assert config.model("chat").limits.queue_timeout_s == 5  # kept: not named in the override
    with pytest.raises(ValueError, match="'nope' is not one of the models"):
        apply_live(base, LiveConfig.model_validate({"limits": {"nope": {}}}))
    with pytest.raises(ValueError, match="default_model"):
        apply_live(base, LiveConfig.model_validate({"default_model": "missing"}))


def test_a_serve_config_file_with_live_overrides(tmp_path: Path) -> None:
    document = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    app = document["applications"][0]
    app["deployments"] = [{"name": "ingress", "user_config": {
        "limits": {"chat": {"max_output_tokens": 77}}}}]
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(document))
    assert load_app_config(path, check_engine=False).model("chat").limits.max_output_tokens == 77
    app["deployments"][0]["user_config"] = {"limits": {"chat": {"max_output_tokens": 0}}}
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError, match="ingress user_config"):
        load_app_config(path, check_engine=False)


def test_engine_settings_override_the_args_key_by_key() -> None:
    from serve_app.config import ModelConfig, apply_engine_settings

    model = ModelConfig.model_validate({
        "name": "chat", "model": "/m/chat", "env": {"A": "1", "B": "2"},
        "engine_kwargs": {"enforce_eager": True, "max_num_seqs": 8}})
    assert apply_engine_settings(model, None) is model
    assert apply_engine_settings(model, {}) is model
    changed = apply_engine_settings(model, {
        "engine_kwargs": {"max_num_seqs": 16, "enforce_eager": None, "dtype": "bfloat16"},
        "env": {"B": None, "C": "3"}, "start_timeout_s": 60})
    assert changed.engine_kwargs == {"max_num_seqs": 16, "dtype": "bfloat16"}
    assert changed.env == {"A": "1", "C": "3"}
    assert changed.start_timeout_s == 60
    assert changed.model_dump(exclude={"engine_kwargs", "env", "start_timeout_s"}) == \
        model.model_dump(exclude={"engine_kwargs", "env", "start_timeout_s"})

    parsers = apply_engine_settings(model, {"openai": {"tool_call_parser": "hermes",
                                                       "enable_auto_tool_choice": True}})
    assert parsers.openai.tool_call_parser == "hermes" and parsers.openai.enable_auto_tool_choice


@pytest.mark.parametrize(("user_config", "culprit"), [
    ({"fake": {"max_model_len": 4096}}, "fake"),
    ({"openai": {"enable_auto_tool_choice": True}}, "needs tool_call_parser"),
    ({"limits": {"max_output_tokens": 5}}, "limits"),
    ({"start_timeout_s": 0}, "start_timeout_s"),
    ({"env": {"A": 1}}, "env.A"),
])
def test_invalid_engine_settings_name_the_setting(user_config: dict[str, Any],
                                                  culprit: str) -> None:
    from serve_app.config import ModelConfig, apply_engine_settings

    model = ModelConfig.model_validate({"name": "chat", "model": "/m/chat"})
    with pytest.raises(ValueError, match=culprit):
        apply_engine_settings(model, user_config)


def test_a_serve_config_file_with_engine_settings(tmp_path: Path) -> None:
    document = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    app = document["applications"][0]
    app["deployments"] = [{"name": "model-code", "user_config": {
        "engine_kwargs": {"max_num_seqs": 4}, "env": {"VLLM_CPU_KVCACHE_SPACE": "2"}}}]
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(document))
    config = load_app_config(path)
    assert config.model("code").engine_kwargs["max_num_seqs"] == 4
    assert config.model("code").env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert config.model("chat") == load_app_config(REPO / "configs" / "local.yaml").model("chat")

    for bad, culprit in [({"engine_kwargs": {"no_such_arg": 1}}, "unknown or reserved vLLM"),
                         ({"openai": {"tool_call_parser": "nope"}}, "not one of vLLM's"),
                         ({"start_timeout_s": -1}, "user_config of model-code")]:
        app["deployments"] = [{"name": "model-code", "user_config": bad}]
        path.write_text(yaml.safe_dump(document))
        with pytest.raises(ConfigError, match=culprit):
            load_app_config(path)
    app["deployments"] = [{"name": "model-nope", "user_config": {"env": {}}}]
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError, match="'model-nope' has a user_config"):
        load_app_config(path, check_engine=False)


def test_a_missing_routing_model_file_fails_the_config(tmp_path: Path) -> None:
    bad = args(routing={"classifier": {"path": str(tmp_path / "missing.json.gz")}})
    with pytest.raises(ConfigError, match="routing.classifier.path"):
        parse_app_config(bad)
    assert parse_app_config(bad, check_engine=False)  # tools that only read the config
