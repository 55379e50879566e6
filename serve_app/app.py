"""The one place that wires Roundhouse together: `build_app(args)` returns the Serve application.

Serve config files point at it with `import_path: serve_app.app:build_app` and pass the app's
settings as `args`; they are validated here before any replica starts.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from ray.serve import Application
from ray.serve.deployment import Deployment

from deployments.engine import EngineFactory
from deployments.model_server import ModelServer
from serve_app.config import (  # noqa: F401  (re-exported: the config helpers' old home)
    MEMORY_RESOURCE,
    AppConfig,
    ConfigError,
    ModelConfig,
    deployment_name,
    load_app_config,
    memory_mib,
    memory_plan_problems,
    parse_app_config,
)
from serve_app.ingress import IngressDeployment

logger = logging.getLogger("ray.serve.roundhouse")

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
        # Engine settings a `serve deploy` may change without touching the app's args (and so
        # without restarting the other models): the Serve config's `deployments:` entry for
        # this deployment sets it (see EngineSettings). Empty, not None, so that removing that
        # entry again brings the args' settings back through `reconfigure`.
        "user_config": {},
    }


def _cluster_memory_resource(config: AppConfig) -> bool:
    """Whether the cluster offers MEMORY_RESOURCE; refuses a plan it cannot hold."""
    import ray

    if not ray.is_initialized():
        return False
    offered = float(ray.cluster_resources().get(  # type: ignore[no-untyped-call]
        MEMORY_RESOURCE, 0.0))
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
    """The application for validated `args` (Serve's import path names this builder, which
    takes exactly the args), every model on vLLM."""
    return build(args)


def build(args: dict[str, Any], engine_factory: EngineFactory | None = None) -> Application:
    """The application for validated `args`; every model's replica runs an engine made by
    `engine_factory` (vLLM's unless given: the tests pass their fake engine)."""
    config = parse_app_config(args, engine=engine_factory)
    memory_resource = _cluster_memory_resource(config)
    # Both are Serve Deployments at run time (Ray's decorator is typed as returning a callable).
    model_server: Deployment = cast(Deployment, ModelServer)
    ingress_deployment: Deployment = cast(Deployment, IngressDeployment)
    models = {
        m.name: model_server.options(**model_deployment_options(m, memory_resource))
        .bind(m.model_dump(), engine_factory)
        for m in config.models
    }
    replicas = config.ingress.num_replicas
    ingress = ingress_deployment.options(
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
        # Fixed size; Serve's application-level autoscaling policy needs every deployment to
        # have an autoscaling_config, and the residency policy leaves this one alone.
        autoscaling_config={"min_replicas": replicas, "max_replicas": replicas,
                            "initial_replicas": replicas},
    )
    return ingress.bind(config.model_dump(), models)


AUTOSCALING_POLICY = {"policy_function": "serve_app.autoscaling:ResidencyPolicy"}

# How Serve should carry requests in a Roundhouse cluster: Ray Serve's own throughput-optimized
# mode (the ingress replica serves HTTP itself, deployments call each other over gRPC, user code
# runs on the replica's event loop) with HAProxy as the HTTP front instead
# of Serve's Python proxy. Measured by benchmarks/path_latency.py: the request path's first byte
# ~4x sooner. These are read when Ray's processes start, so they go in the environment of
# `ray start` (`make serve` does it: `env $(roundhouse ray-env) ray start ...`); a cluster
# started without them runs Roundhouse on Serve's defaults, correctly but slower.
SERVE_TRANSPORT_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # The mode would hold request logs until 1,000 lines: an operator reading a replica's log
    # sees each request when it ends instead.
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    # HAProxy sends traffic to a new ingress replica once its health check passed this many
    # times, this often (Ray's defaults, 2 x 5 s, hold every deploy ~10 s longer).
    "RAY_SERVE_HAPROXY_HEALTH_CHECK_RISE": "1",
    "RAY_SERVE_HAPROXY_HEALTH_CHECK_INTER": "1s",
}


def transport_ports_env(base: int, ranges_from: int) -> dict[str, str]:
    """Moves the fixed ports of Serve's HAProxy mode (HAProxy's stats 8404 and metrics 9101, the
    fallback proxy's 8500 and 9500, the replicas' direct-ingress ranges 30000-31000 and
    40000-41000) to `base`..`base + 3` and 200-port ranges from `ranges_from`, so a second Ray
    cluster on the same machine (the tests', a benchmark's) does not collide with a
    `make serve` one."""
    return {"RAY_SERVE_HAPROXY_STATS_PORT": str(base),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(base + 1),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(base + 2),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(base + 3),
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(ranges_from),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(ranges_from + 199),
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(ranges_from + 200),
            "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(ranges_from + 399)}


def serve_config(args: dict[str, Any], port: int, host: str = "127.0.0.1",
                 app_name: str = "roundhouse",
                 import_path: str = "serve_app.app:build_app") -> dict[str, Any]:
    """A Serve config document (what `serve deploy` takes) for one Roundhouse app at `/`, with
    the residency autoscaling policy it needs."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port},
        "applications": [{
            "name": app_name,
            "route_prefix": "/",
            "import_path": import_path,
            "autoscaling_policy": dict(AUTOSCALING_POLICY),
            "args": args,
        }],
    }
