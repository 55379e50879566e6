from __future__ import annotations

import asyncio

import pytest

from deployments.engine import Engine, EngineRequest, PromptTooLong
from deployments.fake_engine import FakeEngine
from serve_app.config import FakeEngineConfig
from serve_app.protocol import Sampling


async def run(engine: FakeEngine, request: EngineRequest) -> list:
    return [out async for out in engine.generate(request)]


@pytest.fixture
async def engine() -> FakeEngine:
    e = FakeEngine(FakeEngineConfig(tokens_per_s=10_000, max_model_len=32))
    await e.start()
    return e


def test_fake_engine_satisfies_protocol() -> None:
    assert isinstance(FakeEngine(FakeEngineConfig()), Engine)


async def test_deterministic_and_bounded(engine: FakeEngine) -> None:
    req = EngineRequest("a", Sampling(max_tokens=5), prompt="one two three")
    first, second = await run(engine, req), await run(engine, req)
    assert [o.text for o in first] == [o.text for o in second]
    assert sum(o.num_tokens for o in first) == 5
    assert first[-1].finish_reason == "length" and first[0].prompt_tokens == 3


async def test_n_choices_and_stop(engine: FakeEngine) -> None:
    outs = await run(engine, EngineRequest("b", Sampling(max_tokens=4, n=3), prompt="x"))
    assert {o.index for o in outs} == {0, 1, 2}
    word = [o.text for o in outs if o.index == 0][2].strip()
    stopped = await run(engine, EngineRequest("c", Sampling(max_tokens=4, stop=(word,)),
                                              prompt="x"))
    assert stopped[-1].finish_reason == "stop"
    assert word not in "".join(o.text for o in stopped)


async def test_prompt_too_long(engine: FakeEngine) -> None:
    with pytest.raises(PromptTooLong):
        await run(engine, EngineRequest("d", Sampling(), prompt="w " * 40))
    with pytest.raises(PromptTooLong):
        await run(engine, EngineRequest("e", Sampling(max_tokens=31), prompt="a b"))


async def test_abort_ends_the_request() -> None:
    engine = FakeEngine(FakeEngineConfig(tokens_per_s=100))
    await engine.start()
    gen = engine.generate(EngineRequest("f", Sampling(max_tokens=1000), prompt="x"))
    await gen.__anext__()
    assert engine.num_unfinished() == 1
    await engine.abort("f")
    rest = [o async for o in gen]
    assert rest[-1].finish_reason == "abort"
    assert engine.num_unfinished() == 0


async def test_failed_load_raises() -> None:
    from deployments.engine import EngineError

    engine = FakeEngine(FakeEngineConfig(fail_load="out of memory"))
    with pytest.raises(EngineError, match="out of memory"):
        await engine.start()
    await asyncio.sleep(0)
