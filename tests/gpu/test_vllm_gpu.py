"""Real GPU checks; skipped where CUDA is absent (CI and the CPU development machines)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from deployments.asgi import Exchange, http_scope
from serve_app.config import ModelConfig
from serve_app.local_models import SMOLLM2_NAME, models_dir

pytestmark = pytest.mark.gpu


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@dataclass
class _Admitted:
    max_tokens: int

    def produced(self, index: int, tokens: int, cumulative: bool) -> None:
        pass


class _OpenGate:
    """Admits everything (admission itself is tested on CPU)."""

    def __init__(self) -> None:
        self.prompts: list[int] = []

    @asynccontextmanager
    async def generation(self, request_id: str, prompt_tokens: int, max_tokens: int,
                         n: int) -> AsyncIterator[_Admitted]:
        self.prompts.append(prompt_tokens)
        yield _Admitted(max_tokens)


@pytest.mark.skipif(not _cuda(), reason="needs CUDA")
async def test_vllm_engine_on_gpu_with_fractional_memory() -> None:
    from deployments.vllm_engine import VllmEngine

    engine = VllmEngine(ModelConfig(
        name="chat", model=str(models_dir() / SMOLLM2_NAME), num_gpus=0.2,
        engine_kwargs={"gpu_memory_utilization": 0.2, "max_model_len": 2048}))
    gate = _OpenGate()
    await engine.start(gate)
    try:
        assert await engine.kv_capacity_tokens() > 2048
        body = {"model": "chat", "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        exchange = Exchange(engine.app, http_scope("POST", "/v1/chat/completions"),
                            json.dumps(body).encode())
        reply = json.loads(await exchange.read_all())
        assert exchange.status == 200
        assert "Paris" in reply["choices"][0]["message"]["content"]
        assert gate.prompts == [reply["usage"]["prompt_tokens"]]
    finally:
        await engine.shutdown()
