"""A deterministic engine with configurable load and token timings, for lifecycle tests only.

It never loads a model: prompt "tokens" are whitespace-separated words, and the output is a
fixed word sequence chosen by a hash of the prompt, so two runs give the same text.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

from deployments.engine import EngineError, EngineOutput, EngineRequest, PromptTooLong
from serve_app.config import FakeEngineConfig

_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
          "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa")
DEFAULT_OUTPUT_TOKENS = 16


def count_tokens(text: str) -> int:
    return len(text.split())


class FakeEngine:
    def __init__(self, config: FakeEngineConfig) -> None:
        self._config = config
        self._started = False
        self._closed = False
        self._active: dict[str, asyncio.Event] = {}

    @property
    def max_model_len(self) -> int:
        return self._config.max_model_len

    async def start(self) -> None:
        if self._config.load_s:
            await asyncio.sleep(self._config.load_s)  # simulated weight loading
        if self._config.fail_load:
            raise EngineError(self._config.fail_load)
        self._started = True

    def _prompt_text(self, request: EngineRequest) -> str:
        if request.prompt is not None:
            return request.prompt
        return "\n".join(m["content"] for m in request.messages)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if not self._started or self._closed:
            raise EngineError("fake engine is not running")
        text = self._prompt_text(request)
        prompt_tokens = max(1, count_tokens(text))
        sampling = request.sampling
        room = self.max_model_len - prompt_tokens
        if room <= 0 or (sampling.max_tokens and sampling.max_tokens > room):
            raise PromptTooLong(prompt_tokens, sampling.max_tokens, self.max_model_len)
        limit = sampling.max_tokens or min(DEFAULT_OUTPUT_TOKENS, room)
        digest = hashlib.sha256(f"{text}|{sampling.seed}".encode()).digest()
        aborted = asyncio.Event()
        self._active[request.request_id] = aborted
        try:
            if self._config.ttft_s:
                await asyncio.sleep(self._config.ttft_s)  # simulated prefill
            produced = [""] * sampling.n
            done = [False] * sampling.n
            for step in range(limit):
                for index in range(sampling.n):
                    if done[index]:
                        continue
                    if aborted.is_set():
                        yield EngineOutput(index, "", 0, prompt_tokens, "abort")
                        return
                    word = _WORDS[(digest[(step + index) % len(digest)] + step) % len(_WORDS)]
                    piece = word if step == 0 else f" {word}"
                    produced[index] += piece
                    reason: str | None = None
                    if any(s in produced[index] for s in sampling.stop):
                        reason, piece = "stop", ""
                    elif step == limit - 1:
                        reason = "length" if sampling.max_tokens else "stop"
                    done[index] = reason is not None
                    yield EngineOutput(index, piece, 1, prompt_tokens, reason)
                if all(done):
                    return
                await asyncio.sleep(1.0 / self._config.tokens_per_s)  # simulated decode step
        finally:
            self._active.pop(request.request_id, None)

    async def abort(self, request_id: str) -> None:
        event = self._active.get(request_id)
        if event is not None:
            event.set()

    def num_unfinished(self) -> int:
        return len(self._active)

    async def check_health(self) -> None:
        if not self._started or self._closed:
            raise EngineError("fake engine is not running")

    async def kv_capacity_tokens(self) -> int:
        return self._config.kv_capacity_tokens

    async def shutdown(self) -> None:
        self._closed = True
        for event in self._active.values():
            event.set()
