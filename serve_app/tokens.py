"""Prompt token counts in the ingress, with each model's own tokenizer (loaded once, cached).

The ingress needs them before a request reaches a model: to refuse prompt + max_tokens beyond
the context with a 400 that names both numbers, and to tell the model replica how many KV
tokens to reserve. Chat prompts are counted after the model's chat template, as vLLM renders
them. A tokenizer that cannot be loaded (no local files, no hub access) falls back to an
estimate (characters / 3) with a warning; the engine still checks the exact count.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Sequence
from typing import Any, Protocol

from serve_app.config import ModelConfig

logger = logging.getLogger("ray.serve.roundhouse")


class TokenCounter(Protocol):
    exact: bool

    def chat(self, messages: Sequence[dict[str, str]]) -> int: ...

    def text(self, prompt: str) -> int: ...


class WordCounter:
    """The fake engine's tokenizer: one token per whitespace-separated word."""

    exact = True

    def chat(self, messages: Sequence[dict[str, str]]) -> int:
        return max(1, len("\n".join(m["content"] for m in messages).split()))

    def text(self, prompt: str) -> int:
        return max(1, len(prompt.split()))


class EstimateCounter:
    """No tokenizer available: ~3 characters per token errs on the side of reserving more."""

    exact = False

    def chat(self, messages: Sequence[dict[str, str]]) -> int:
        return max(1, sum(len(m["content"]) + 8 for m in messages) // 3)

    def text(self, prompt: str) -> int:
        return max(1, len(prompt) // 3)


class HfCounter:
    """A Hugging Face tokenizer with the model's chat template."""

    exact = True

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        # Fast tokenizers raise "Already borrowed" when one is used from two threads at once
        # (the ingress counts long prompts off the event loop).
        self._lock = threading.Lock()

    def chat(self, messages: Sequence[dict[str, str]]) -> int:
        with self._lock:
            ids = self._tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                                      tokenize=True)
        if not isinstance(ids, list):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return len(ids)

    def text(self, prompt: str) -> int:
        with self._lock:
            return len(self._tokenizer(prompt)["input_ids"])


@functools.cache
def _hf_counter(path: str, trust_remote_code: bool) -> TokenCounter:
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        logger.warning("tokenizer of %s could not be loaded (%s); prompt tokens are estimated",
                       path, type(exc).__name__)
        return EstimateCounter()
    return HfCounter(tokenizer)


def counter_for(model: ModelConfig) -> TokenCounter:
    """The counter for a model's engine; tokenizers are shared between models of one path."""
    if model.engine == "fake":
        return WordCounter()
    from serve_app.local_models import resolve_model_path

    path = resolve_model_path(model.model)
    return _hf_counter(str(path), bool(model.engine_kwargs.get("trust_remote_code", False)))


def max_model_len(model: ModelConfig) -> int | None:
    """The context length the config gives the engine, if it says."""
    if model.engine == "fake":
        from serve_app.config import FakeEngineConfig

        return (model.fake or FakeEngineConfig()).max_model_len
    value = model.engine_kwargs.get("max_model_len")
    return int(value) if value else None
