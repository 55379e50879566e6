"""Shared fixtures: one local Ray cluster per test session, Serve on a port of its own.

The port is not 8000 so the suite runs beside a `make serve` server.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_PORT = int(os.environ.get("ROUNDHOUSE_TEST_PORT", "18000"))
APP_NAME = "roundhouse"


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


@pytest.fixture(scope="session")
def ray_serve() -> Iterator[str]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    ray.init(address="local", include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": TEST_PORT})
    try:
        yield f"http://127.0.0.1:{TEST_PORT}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def deploy(ray_serve: str) -> Callable[[dict[str, Any]], str]:
    """Deploys app args as the one `roundhouse` app at `/` (replacing any earlier one)."""
    from ray import serve

    from serve_app.app import build_app

    def _deploy(args: dict[str, Any]) -> str:
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        return ray_serve

    return _deploy


def model_handle(model: str) -> Any:
    from ray import serve

    from serve_app.config import deployment_name

    return serve.get_deployment_handle(deployment_name(model), app_name=APP_NAME)
