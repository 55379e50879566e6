"""The tests' fake engine keeps the Engine interface the replica relies on."""

from __future__ import annotations

import pytest

from deployments.engine import Engine, EngineError, config_problems
from serve_app.config import ModelConfig
from tests.fake_engine import FakeEngine


def model(**engine_kwargs: object) -> ModelConfig:
    return ModelConfig(name="m", model="fake", engine_kwargs=engine_kwargs)


def test_fake_engine_satisfies_the_protocol() -> None:
    assert isinstance(FakeEngine(model()), Engine)


def test_its_settings_are_checked_as_engine_settings() -> None:
    assert config_problems(FakeEngine, model(tokens_per_s=5)) == []
    assert config_problems(FakeEngine, model(tokens_per_s=-1))
    assert config_problems(FakeEngine, model(no_such_setting=1))


async def test_failed_load_raises() -> None:
    engine = FakeEngine(model(fail_load="out of memory"))
    with pytest.raises(EngineError, match="out of memory"):
        await engine.start(gate=None)  # type: ignore[arg-type]
