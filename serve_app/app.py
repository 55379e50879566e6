"""The one place that wires Roundhouse together: `build_app(args)` returns the Serve application.

Serve config files point at it with `import_path: serve_app.app:build_app` and pass the app's
settings as `args`; they are validated here before any replica starts.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from ray.serve import Application

from deployments.model_server import ModelServer
from serve_app.config import AppConfig, ModelConfig, deployment_name
from serve_app.ingress import IngressDeployment
from serve_app.policy.residency import ModelSpec, check_memory_plan

logger = logging.getLogger("ray.serve.roundhouse")

# A Ray custom resource standing for accelerator memory on CPU hosts: when the cluster offers it
# (`make serve` starts Ray with it), each CPU model replica asks for its memory_gib of it, so Ray
# itself does not start a model before an evicted one has exited. On GPU hosts the fractional
# num_gpus does the same.
MEMORY_RESOURCE = "roundhouse_memory_mib"


def memory_mib(gib: float) -> int:
    """Ray wants whole resource quantities; MiB are fine-grained enough."""
    return int(math.ceil(gib * 1024))
# vLLM's gpu_memory_utilization and Ray's num_gpus are fractions of the same device.
_SHARE_TOLERANCE = 0.01


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
    problems = memory_plan_problems(config)
    if problems:
        raise ConfigError("memory plan does not hold: " + "; ".join(problems))
    return config


def memory_plan_problems(config: AppConfig) -> list[str]:
    """The memory plan, checked before anything starts: pinned models plus the largest on-demand
    model fit the budget, and on GPU each model's memory_gib, its Ray num_gpus share of the
    device and vLLM's gpu_memory_utilization say the same thing."""
    budget = config.budget_gib
    specs = {m.name: ModelSpec(m.name, m.memory_gib, m.pinned) for m in config.models}
    problems = check_memory_plan(specs, budget)
    on_gpu = [m for m in config.models if m.num_gpus > 0]
    if on_gpu and config.residency.gpu_memory_gib is None:
        problems.append("models use num_gpus, so residency.gpu_memory_gib (the device's "
                        "memory) must be set")
        return problems
    if on_gpu and len(on_gpu) != len(config.models):
        cpu = ", ".join(m.name for m in config.models if m.num_gpus == 0)
        problems.append(f"some models use num_gpus and others ({cpu}) do not; put all of them "
                        "on the accelerator or none")
    for m in on_gpu:
        share_gib = m.num_gpus * budget
        if abs(share_gib - m.memory_gib) > _SHARE_TOLERANCE * budget:
            problems.append(
                f"{m.name}: num_gpus {m.num_gpus} x {budget:.1f} GiB = {share_gib:.1f} GiB, but "
                f"memory_gib is {m.memory_gib:.1f} GiB; set num_gpus to "
                f"{m.memory_gib / budget:.3f}")
        if m.engine == "vllm":
            util = m.engine_kwargs.get("gpu_memory_utilization")
            if util is None:
                problems.append(f"{m.name}: set engine_kwargs.gpu_memory_utilization to "
                                f"{m.num_gpus} (vLLM would take 90% of the device)")
            elif abs(float(util) - m.num_gpus) > _SHARE_TOLERANCE:
                problems.append(f"{m.name}: gpu_memory_utilization {util} differs from "
                                f"num_gpus {m.num_gpus}")
    return problems


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


def model_deployment_options(model: ModelConfig, memory_resource: bool = False) -> dict[str, Any]:
    actor_options: dict[str, Any] = {
        # The engine's own processes do the work; the replica mostly waits on them.
        "num_cpus": 0,
        "num_gpus": model.num_gpus,
    }
    if memory_resource and model.num_gpus == 0:
        actor_options["resources"] = {MEMORY_RESOURCE: memory_mib(model.memory_gib)}
    if model.env:
        actor_options["runtime_env"] = {"env_vars": dict(model.env)}
    return {
        "name": deployment_name(model.name),
        "max_ongoing_requests": model.max_ongoing_requests,
        "ray_actor_options": actor_options,
        # 0 or 1 replica, decided by the residency controller through the application's
        # autoscaling policy; Serve's own timing is switched off (all delays 0).
        "autoscaling_config": {
            "min_replicas": 0,
            "max_replicas": 1,
            "initial_replicas": 1 if (model.pinned or model.preload) else 0,
            "upscale_delay_s": 0,
            "downscale_delay_s": 0,
            "downscale_to_zero_delay_s": 0,
            "look_back_period_s": 30,
            "metrics_interval_s": 10,
        },
        # The controller drains a model before it stops it; this bounds the stop itself.
        "graceful_shutdown_timeout_s": 5,
    }


def _cluster_memory_resource(config: AppConfig) -> bool:
    """Whether the cluster offers MEMORY_RESOURCE; refuses a plan it cannot hold."""
    import ray

    if not ray.is_initialized():
        return False
    offered = float(ray.cluster_resources().get(MEMORY_RESOURCE, 0.0))
    if offered <= 0:
        if any(m.num_gpus == 0 for m in config.models):
            logger.warning("the Ray cluster offers no %s resource; the residency controller "
                           "alone keeps CPU models within the budget (start Ray with "
                           "`--resources \"$(roundhouse ray-resources CONFIG)\"`)",
                           MEMORY_RESOURCE)
        return False
    largest = max(config.models, key=lambda m: m.memory_gib)
    if largest.num_gpus == 0 and memory_mib(largest.memory_gib) > offered:
        raise ConfigError(f"model {largest.name!r} needs {memory_mib(largest.memory_gib)} MiB "
                          f"but the cluster offers {offered:.0f} of the {MEMORY_RESOURCE} "
                          "resource")
    return True


def build_app(args: dict[str, Any]) -> Application:
    config = parse_app_config(args)
    memory_resource = _cluster_memory_resource(config)
    models = {
        m.name: ModelServer.options(**model_deployment_options(m, memory_resource))
        .bind(m.model_dump())
        for m in config.models
    }
    replicas = config.ingress.num_replicas
    ingress = IngressDeployment.options(
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
        # Fixed size; Serve's application-level autoscaling policy needs every deployment to
        # have an autoscaling_config, and the residency policy leaves this one alone.
        autoscaling_config={"min_replicas": replicas, "max_replicas": replicas,
                            "initial_replicas": replicas},
    )
    return ingress.bind(config.model_dump(), models)


AUTOSCALING_POLICY = {"policy_function": "serve_app.autoscaling:ResidencyPolicy"}


def serve_config(args: dict[str, Any], port: int, host: str = "127.0.0.1",
                 app_name: str = "roundhouse") -> dict[str, Any]:
    """A Serve config document (what `serve deploy` takes) for one Roundhouse app at `/`, with
    the residency autoscaling policy it needs."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port},
        "applications": [{
            "name": app_name,
            "route_prefix": "/",
            "import_path": "serve_app.app:build_app",
            "autoscaling_policy": dict(AUTOSCALING_POLICY),
            "args": args,
        }],
    }
