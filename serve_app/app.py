"""The one place that wires Roundhouse together: `build_app(args)` returns the Serve application.

Serve config files point at it with `import_path: serve_app.app:build_app` and pass the app's
settings as `args`; they are validated here before any replica starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from ray.serve import Application

from deployments.model_server import ModelServer
from serve_app.config import AppConfig, ModelConfig, deployment_name
from serve_app.ingress import IngressDeployment


class ConfigError(ValueError):
    """The app args are invalid; the message says which setting and why."""


def parse_app_config(args: dict[str, Any]) -> AppConfig:
    try:
        config = AppConfig.model_validate(args)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'args'}: "
            f"{str(err['msg']).removeprefix('Value error, ')}"
            for err in exc.errors(include_url=False)
        )
        raise ConfigError(f"invalid Roundhouse config: {problems}") from None
    from deployments.vllm_engine import check_engine_kwargs

    for model in config.models:
        unknown = check_engine_kwargs(model.engine_kwargs) if model.engine == "vllm" else []
        if unknown:
            raise ConfigError(f"invalid Roundhouse config: model {model.name!r}: unknown vLLM "
                              f"engine_kwargs: {', '.join(unknown)}")
    return config


def load_app_config(path: str | Path, app: str | None = None) -> AppConfig:
    """The validated args of one application in a Serve config file."""
    document = yaml.safe_load(Path(path).read_text())
    apps = (document or {}).get("applications") or []
    if not apps:
        raise ConfigError(f"{path}: no applications")
    chosen = next((a for a in apps if app is None or a.get("name") == app), None)
    if chosen is None:
        raise ConfigError(f"{path}: no application named {app!r}")
    return parse_app_config(chosen.get("args") or {})


def model_deployment_options(model: ModelConfig) -> dict[str, Any]:
    actor_options: dict[str, Any] = {
        # The engine's own processes do the work; the replica mostly waits on them.
        "num_cpus": 0,
        "num_gpus": model.num_gpus,
    }
    if model.env:
        actor_options["runtime_env"] = {"env_vars": dict(model.env)}
    return {
        "name": deployment_name(model.name),
        "num_replicas": 1,
        "max_ongoing_requests": model.max_ongoing_requests,
        "ray_actor_options": actor_options,
        # Loading weights and allocating KV cache takes a while on a cold start.
        "graceful_shutdown_timeout_s": 30,
    }


def build_app(args: dict[str, Any]) -> Application:
    config = parse_app_config(args)
    models = {
        m.name: ModelServer.options(**model_deployment_options(m)).bind(m.model_dump())
        for m in config.models
    }
    ingress = IngressDeployment.options(
        num_replicas=config.ingress.num_replicas,
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(config.model_dump(), models)
