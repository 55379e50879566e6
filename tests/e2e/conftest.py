"""End-to-end fixtures: configs/local.yaml on real vLLM engines, deployed once for the session
(each cold start costs ~40 s on this machine), and vLLM's own OpenAI server on the same model
and settings, for the parity suite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from serve_app.app import load_app_config
from serve_app.local_models import resolve_model_path
from tests.conftest import REPO, wait_until

# chat's admission gets a small share of its real KV cache here, so a burst of long outputs
# must queue (see test_burst_of_long_outputs_does_not_starve_short_requests).
CHAT_LIMITS = {"kv_budget_fraction": 0.15, "max_queued_requests": 16, "queue_timeout_s": 240}
REFERENCE_PORT = int(os.environ.get("ROUNDHOUSE_TEST_VLLM_PORT", "18100"))


def app_args() -> dict[str, Any]:
    args = load_app_config(REPO / "configs" / "local.yaml").model_dump()
    chat = next(m for m in args["models"] if m["name"] == "chat")
    chat["limits"].update(CHAT_LIMITS)
    return args


@pytest.fixture(scope="session")
def base_url(deploy: Any) -> str:
    return str(deploy(app_args()))


@pytest.fixture(scope="session")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def reference_command(port: int) -> list[str]:
    """`vllm serve` for the local chat model with the flags its config gives Roundhouse."""
    chat = load_app_config(REPO / "configs" / "local.yaml").model("chat")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(resolve_model_path(chat.model)), "--served-model-name", chat.name,
           "--host", "127.0.0.1", "--port", str(port), "--disable-log-stats"]
    settings = chat.openai
    engine = dict(chat.engine_kwargs)
    structured = dict(engine.get("structured_outputs_config") or {})
    if settings.structured_outputs_backend:
        structured["backend"] = settings.structured_outputs_backend
    if settings.reasoning_parser:
        structured["reasoning_parser"] = settings.reasoning_parser
    if structured:
        engine["structured_outputs_config"] = structured
    for key, value in engine.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        else:
            cmd += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    if settings.enable_auto_tool_choice:
        cmd.append("--enable-auto-tool-choice")
    if settings.tool_call_parser:
        cmd += ["--tool-call-parser", settings.tool_call_parser]
    for key, value in settings.frontend_kwargs.items():
        cmd += ["--" + key.replace("_", "-"), str(value)]
    return cmd


@pytest.fixture(scope="session")
def reference_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's own OpenAI server on the chat model, pinned to the other core than Roundhouse's
    chat engine, so both compute the same numbers side by side."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "1"}
    log = open(tmp_path_factory.mktemp("reference") / "vllm.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(reference_command(REFERENCE_PORT), env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{REFERENCE_PORT}"

    def healthy() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"vLLM's server exited with {proc.returncode}; see {log.name}")
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, 300, "vLLM's own server to start", interval_s=1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
