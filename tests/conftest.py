"""Shared fixtures: one local Ray cluster per test session, Serve on a port of its own.

The port is not 8000 so the suite runs beside a `make serve` server.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# A Ray call after the session's cluster is gone (a Serve handle's background metrics push, at
# exit) must not start a new local cluster behind the test run's back.
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

REPO = Path(__file__).resolve().parent.parent
TEST_PORT = int(os.environ.get("ROUNDHOUSE_TEST_PORT", "18000"))
APP_NAME = "roundhouse"
# The app with the fake engine behind every model.
FAKE_IMPORT_PATH = "tests.fake_engine:build_app"
# Ray's Prometheus endpoint for the test cluster (tests/serve/test_operations.py).
METRICS_PORT = int(os.environ.get("ROUNDHOUSE_TEST_METRICS_PORT", "18090"))
# Where the test cluster's HAProxy mode puts its own ports (serve_app.app.transport_ports_env),
# away from a `make serve` cluster's defaults.
TRANSPORT_PORTS = (20410, 21000)


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str,
               interval_s: float = 0.05) -> Any:
    """Polls `predicate` until it returns something truthy; fails the test on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


# The memory Ray offers to CPU model replicas (see serve_app/app.py, MEMORY_RESOURCE): the
# budget of configs/local.yaml, so Ray holds the same plan as the controller in e2e tests.
CLUSTER_MEMORY_GIB = 6.5


@pytest.fixture(scope="session")
def ray_serve() -> Iterator[str]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    # The suite runs on Serve's default transport: HAProxy mode (what `make serve` starts Ray
    # with) holds each fresh deploy ~15 s longer and the suite deploys ~100 times, so it is
    # opt-in here (ROUNDHOUSE_TEST_TRANSPORT=haproxy: the cluster's processes start with it,
    # this test process keeps Serve's defaults for its handles). tests/e2e/test_shutdown.py runs
    # `ray start` / `serve deploy` with it on real vLLM either way.
    from serve_app.app import (
        MEMORY_RESOURCE,
        SERVE_TRANSPORT_ENV,
        memory_mib,
        transport_ports_env,
    )

    transport = SERVE_TRANSPORT_ENV | transport_ports_env(*TRANSPORT_PORTS) if (
        os.environ.get("ROUNDHOUSE_TEST_TRANSPORT") == "haproxy") else {}
    saved = {key: os.environ.get(key) for key in transport}
    os.environ.update(transport)
    try:
        # The replicas import the fake engine from this repository's tests package.
        ray.init(address="local", include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False,
                 resources={MEMORY_RESOURCE: memory_mib(CLUSTER_MEMORY_GIB)},
                 _metrics_export_port=METRICS_PORT,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    serve.start(http_options={"host": "127.0.0.1", "port": TEST_PORT})
    try:
        yield f"http://127.0.0.1:{TEST_PORT}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def remove_app() -> None:
    """Deletes the app and its residency controller, so the next deploy starts from nothing."""
    import ray
    from ray import serve

    from serve_app.controller import lookup

    if APP_NAME in serve.status().applications:
        serve.delete(APP_NAME)
    actor = lookup(APP_NAME)
    if actor is not None:
        ray.kill(actor, no_restart=True)
        wait_until(lambda: lookup(APP_NAME) is None, 30, "the old controller to go")


@pytest.fixture(scope="session")
def deploy(ray_serve: str) -> Callable[..., str]:
    """Deploys app args as the one `roundhouse` app at `/` through a Serve config (with the
    residency autoscaling policy), replacing any earlier app and controller."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    from serve_app.app import serve_config

    def _deploy(args: dict[str, Any], timeout_s: float = 300,
                logging_config: dict[str, Any] | None = None,
                deployments: list[dict[str, Any]] | None = None, fresh: bool = True) -> str:
        """`fresh=False` deploys over the running app, as a second `serve deploy` does. Models
        whose `model` is "fake" run the fake engine (tests/fake_engine.py), all or none."""
        if fresh:
            remove_app()
        client = serve_start()
        fake = [m.get("model") == "fake" for m in args["models"]]
        if any(fake) and not all(fake):
            raise ValueError("the fake engine serves all models of an app or none")
        import_path = FAKE_IMPORT_PATH if all(fake) else "serve_app.app:build_app"
        document = serve_config(args, TEST_PORT, app_name=APP_NAME, import_path=import_path)
        if logging_config is not None:
            document["applications"][0]["logging_config"] = logging_config
        if deployments is not None:
            document["applications"][0]["deployments"] = deployments
        client.deploy_apps(ServeDeploySchema.model_validate(document))
        wait_until(lambda: app_status() in ("RUNNING", "DEPLOY_FAILED"), timeout_s,
                   "the app to deploy", interval_s=0.2)
        assert app_status() == "RUNNING", app_message()
        return ray_serve

    return _deploy


def app_status() -> str | None:
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    return None if app is None else str(app.status.value)


def app_message() -> str:
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    return "" if app is None else f"{app.status}: {app.message}"


def replicas(model: str) -> int:
    """Running replicas of a model's deployment, as Serve's status API reports them."""
    from ray import serve

    from serve_app.config import deployment_name

    app = serve.status().applications.get(APP_NAME)
    if app is None or deployment_name(model) not in app.deployments:
        return 0
    counts = app.deployments[deployment_name(model)].replica_states
    return int(counts.get("RUNNING", 0))


def controller_status() -> dict[str, Any]:
    import ray

    from serve_app.controller import lookup

    actor = lookup(APP_NAME)
    assert actor is not None, "no residency controller"
    return dict(ray.get(actor.status.remote(), timeout=10))


def model_handle(model: str) -> Any:
    from ray import serve

    from serve_app.config import deployment_name

    return serve.get_deployment_handle(deployment_name(model), app_name=APP_NAME)


# --- diagnostics: a failed test against the cluster shows Serve's recent warnings ------------

_LOG_FILES = ("serve/controller_*.log", "serve/proxy_*.log", "serve/replica_*ingress*.log",
              "serve/replica_*model-*.log", "worker-*.err")  # .err: the residency controller


def _notable(line: str) -> bool:
    return " WARNING " in line or " ERROR " in line or "roundhouse.controller" in line


def _serve_log_tail(files: int = 8, lines_per_file: int = 15) -> str:
    """The warnings and errors (and the controller's decisions) of the cluster's most recently
    written Serve and worker logs."""
    logs = Path("/tmp/ray/session_latest/logs")
    paths = {path for pattern in _LOG_FILES for path in logs.glob(pattern)}
    found: list[str] = []
    for path in sorted(paths, key=lambda p: p.stat().st_mtime)[-files:]:
        try:
            notable = [line[:400] for line in path.read_text(errors="replace").splitlines()
                       if _notable(line)]
        except OSError:
            continue
        if notable:
            found += [f"--- {path.name}", *notable[-lines_per_file:]]
    return "\n".join(found)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and "ray_serve" in getattr(item, "fixturenames", ()):
        with contextlib.suppress(Exception):
            report.sections.append(("Serve logs (warnings and errors)", _serve_log_tail()))
