"""Clean shutdown, as `make serve` / `make stop` do it: a Ray cluster started with `ray start`,
the app deployed with `serve deploy`, then `serve shutdown` stops every vLLM engine process and
`ray stop` leaves nothing of Ray behind. Runs last: `ray stop` stops every Ray cluster on the
machine, so the session's own cluster is shut down first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from serve_app.app import load_app_config, serve_config
from tests.conftest import REPO, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.last]

BIN = Path(sys.executable).parent
GCS_PORT, DASHBOARD_PORT, HTTP_PORT = 6391, 8366, 18400


def engine_processes() -> set[int]:
    """vLLM engine processes on this machine (their command line names EngineCore)."""
    found = set()
    for proc in psutil.process_iter(["cmdline", "name", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["name"] or "")
        if "EngineCore" in text:
            found.add(proc.pid)
    return found


def ray_processes() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name", "status"])
            if p.info["name"] in ("raylet", "gcs_server")
            and p.info["status"] != psutil.STATUS_ZOMBIE}


def run(*cmd: str, timeout: float = 300) -> None:
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{GCS_PORT}", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)}: {done.stdout[-2000:]}{done.stderr[-2000:]}"


def test_serve_shutdown_then_ray_stop_leave_no_engine_or_ray_process(tmp_path: Path) -> None:
    import ray

    ray.shutdown()  # the session's cluster: every other test is done with it
    wait_until(lambda: not ray_processes(), 60, "the session's cluster to stop")
    before = engine_processes()
    args: dict[str, Any] = load_app_config(REPO / "configs" / "local.yaml").model_dump()
    args["models"] = [m for m in args["models"] if m["name"] == "chat"]
    args["routing"] = {}
    config = tmp_path / "serve.yaml"
    config.write_text(json.dumps(serve_config(args, HTTP_PORT)))  # JSON is YAML

    run(str(BIN / "ray"), "start", "--head", "--port", str(GCS_PORT), "--include-dashboard",
        "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(DASHBOARD_PORT),
        "--disable-usage-stats")
    try:
        run(str(BIN / "serve"), "deploy", str(config), "--address",
            f"http://127.0.0.1:{DASHBOARD_PORT}")
        run(str(BIN / "roundhouse"), "wait-ready", "--url", f"http://127.0.0.1:{HTTP_PORT}",
            "--timeout", "400", timeout=450)
        resp = httpx.post(f"http://127.0.0.1:{HTTP_PORT}/v1/completions", timeout=120,
                          json={"model": "chat", "prompt": "Hello", "max_tokens": 2})
        assert resp.status_code == 200, resp.text
        engines = engine_processes() - before
        assert engines, "no vLLM engine process found for the deployed model"

        run(str(BIN / "serve"), "shutdown", "-y", "--address",
            f"http://127.0.0.1:{DASHBOARD_PORT}")
        wait_until(lambda: not (engines & engine_processes()), 60,
                   "serve shutdown to stop the engine processes")
    finally:
        run(str(BIN / "ray"), "stop", timeout=120)
    wait_until(lambda: not ray_processes() and not engine_processes() - before, 60,
               "ray stop to leave no Ray or engine process")
