"""Clean shutdown, as `make serve` / `make stop` do it: a Ray cluster started with `ray start`,
the app deployed with `serve deploy`, then `serve shutdown` stops every vLLM engine process and
`ray stop` leaves nothing of Ray behind.

The test starts a cluster of its own (own ports, own `--temp-dir`) and looks only at that
cluster's processes, so it runs beside the session's cluster, a `make serve` server or another
test run on the same machine; `ray stop` runs over this cluster's processes only (see
tests/e2e/scoped_ray_stop.py): a plain `ray stop` would stop every Ray cluster on the machine."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from serve_app.app import (
    SERVE_TRANSPORT_ENV,
    load_app_config,
    serve_config,
    transport_ports_env,
)
from tests.conftest import REPO, wait_until
from tests.e2e.scoped_ray_stop import alive, cluster_processes

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
GCS_PORT, DASHBOARD_PORT, HTTP_PORT = 6391, 8366, 18400


def engines(processes: dict[int, float]) -> dict[int, float]:
    """The vLLM engine processes among them (their command line names EngineCore)."""
    found = {}
    for pid in alive(processes):
        try:
            proc = psutil.Process(pid)
            text = " ".join(proc.cmdline()) + " " + proc.name()
        except psutil.Error:
            continue
        if "EngineCore" in text:
            found[pid] = processes[pid]
    return found


def run(*cmd: str, timeout: float = 300) -> None:
    # As `make serve`: Ray's processes start with Serve's transport settings (HAProxy front).
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{GCS_PORT}", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", **SERVE_TRANSPORT_ENV,
           **transport_ports_env(20420, 21400)}  # beside the session's test cluster
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
    assert done.returncode == 0, f"{' '.join(cmd)}: {done.stdout[-2000:]}{done.stderr[-2000:]}"


@pytest.fixture
def temp_dir() -> Iterator[str]:
    """Short: Ray puts unix sockets under it (about 100 characters at most)."""
    path = tempfile.mkdtemp(prefix="rhstop-", dir="/tmp")
    yield path
    for pid in alive(cluster_processes(path)):  # after a failure: leave nothing running
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()
    shutil.rmtree(path, ignore_errors=True)


def test_serve_shutdown_then_ray_stop_leave_no_engine_or_ray_process(
        tmp_path: Path, temp_dir: str) -> None:
    args: dict[str, Any] = load_app_config(REPO / "configs" / "local.yaml").model_dump()
    args["models"] = [m for m in args["models"] if m["name"] == "chat"]
    args["routing"] = {}
    config = tmp_path / "serve.yaml"
    config.write_text(json.dumps(serve_config(args, HTTP_PORT)))  # JSON is YAML

    run(str(BIN / "ray"), "start", "--head", "--port", str(GCS_PORT), "--temp-dir", temp_dir,
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port",
        str(DASHBOARD_PORT), "--disable-usage-stats")
    run(str(BIN / "serve"), "deploy", str(config), "--address",
        f"http://127.0.0.1:{DASHBOARD_PORT}")
    run(str(BIN / "roundhouse"), "wait-ready", "--url", f"http://127.0.0.1:{HTTP_PORT}",
        "--timeout", "400", timeout=450)
    resp = httpx.post(f"http://127.0.0.1:{HTTP_PORT}/v1/completions", timeout=120,
                      json={"model": "chat", "prompt": "Hello", "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    # A stream through HAProxy arrives as events, ends with [DONE], with our headers.
    with httpx.stream("POST", f"http://127.0.0.1:{HTTP_PORT}/v1/chat/completions", timeout=120,
                      json={"model": "chat", "max_tokens": 8, "stream": True, "messages": [
                          {"role": "user", "content": "Hello"}]}) as stream:
        assert stream.status_code == 200
        assert stream.headers["x-roundhouse-model"] == "chat"
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert len(events) >= 3 and events[-1] == "data: [DONE]", events
    started = engines(cluster_processes(temp_dir))
    assert started, "no vLLM engine process found in the test's cluster"

    run(str(BIN / "serve"), "shutdown", "-y", "--address",
        f"http://127.0.0.1:{DASHBOARD_PORT}")
    wait_until(lambda: not alive(started), 60, "serve shutdown to stop the engine processes")
    cluster = cluster_processes(temp_dir)
    assert any(psutil.Process(pid).name() == "raylet" for pid in alive(cluster)), \
        "the cluster should still run after serve shutdown"

    subprocess.run([sys.executable, "-m", "tests.e2e.scoped_ray_stop", temp_dir], cwd=REPO,
                   check=True, capture_output=True, timeout=120)
    wait_until(lambda: not alive(cluster) and not cluster_processes(temp_dir), 60,
               "ray stop to leave no Ray or engine process of the cluster")
