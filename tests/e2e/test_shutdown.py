"""Clean shutdown: `serve shutdown` stops every vLLM engine process, and `ray stop` leaves
nothing of Ray behind. Runs last in the session (it stops the session's cluster)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from serve_app.app import load_app_config
from tests.conftest import REPO, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.last]


def engine_processes() -> set[int]:
    """vLLM engine processes on this machine (their command line names EngineCore)."""
    found = set()
    for proc in psutil.process_iter(["cmdline", "name"]):
        text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["name"] or "")
        if "EngineCore" in text:
            found.add(proc.pid)
    return found


def ray_processes() -> set[int]:
    names = ("raylet", "gcs_server")
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in names}


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if psutil.pid_exists(pid)
            and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE}


def test_serve_shutdown_then_ray_stop_leave_no_engine_or_ray_process(deploy: Any) -> None:
    from ray import serve

    before = engine_processes()
    args = load_app_config(REPO / "configs" / "local.yaml").model_dump()
    args["models"] = [m for m in args["models"] if m["name"] == "chat"]
    args["routing"] = {}
    base_url = deploy(args)
    resp = httpx.post(f"{base_url}/v1/completions", timeout=120,
                      json={"model": "chat", "prompt": "Hello", "max_tokens": 2})
    assert resp.status_code == 200
    engines = engine_processes() - before
    assert engines, "no vLLM engine process found for the deployed model"

    serve.shutdown()
    wait_until(lambda: not alive(engines), 60, "serve shutdown to stop the engine processes")

    ray_stop = Path(sys.executable).parent / "ray"
    subprocess.run([str(ray_stop), "stop"], check=True, capture_output=True, timeout=120)
    wait_until(lambda: not ray_processes() and not engine_processes(), 60,
               "ray stop to leave no Ray or engine process")
