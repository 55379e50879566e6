"""Real GPU checks; skipped where CUDA is absent (CI and the CPU development machines)."""

from __future__ import annotations

import pytest

from deployments.engine import EngineRequest
from serve_app.config import ModelConfig
from serve_app.local_models import SMOLLM2_NAME, models_dir
from serve_app.protocol import Sampling

pytestmark = pytest.mark.gpu


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.mark.skipif(not _cuda(), reason="needs CUDA")
async def test_vllm_engine_on_gpu_with_fractional_memory() -> None:
    from deployments.vllm_engine import VllmEngine

    engine = VllmEngine(ModelConfig(
        name="chat", model=str(models_dir() / SMOLLM2_NAME), num_gpus=0.2,
        engine_kwargs={"gpu_memory_utilization": 0.2, "max_model_len": 2048}))
    await engine.start()
    try:
        assert await engine.kv_capacity_tokens() > 2048
        outs = [o async for o in engine.generate(EngineRequest(
            "g1", Sampling(max_tokens=8, temperature=0),
            messages=({"role": "user", "content": "What is the capital of France?"},)))]
        assert "Paris" in "".join(o.text for o in outs)
    finally:
        await engine.shutdown()
