"""The real engine: vLLM's AsyncLLM inside the model replica.

Chat prompts are rendered by vLLM's own renderer (the model's chat template, as vLLM's OpenAI
server does it), then handed to the engine as token ids so the prompt is tokenized once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from deployments.engine import (
    EngineError,
    EngineOutput,
    EngineRequest,
    InvalidRequest,
    PromptTooLong,
)
from serve_app.config import ModelConfig
from serve_app.local_models import resolve_model_path

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger("ray.serve.roundhouse")  # Serve's replica log files

# Settings we own: the engine must stream deltas to us and not log prompts.
_RESERVED_KWARGS = frozenset({"enable_log_requests"})


def check_engine_kwargs(kwargs: dict[str, Any]) -> list[str]:
    """Names in `kwargs` that vLLM's AsyncEngineArgs does not know (empty if vLLM is absent)."""
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
    except ImportError:
        return []
    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    return sorted(k for k in kwargs if k not in known or k in _RESERVED_KWARGS)


def _client_error() -> type[Exception]:
    """vLLM's base class for errors caused by the request (imported lazily: vLLM is optional)."""
    from vllm.exceptions import VLLMClientError

    return VLLMClientError


class VllmEngine:
    def __init__(self, config: ModelConfig) -> None:
        self._config = config
        self._llm: AsyncLLM | None = None
        self._max_model_len = 0
        self._defaults: dict[str, Any] = {}

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def _require(self) -> AsyncLLM:
        if self._llm is None:
            raise EngineError(f"model {self._config.name}: engine is not running")
        return self._llm

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        unknown = check_engine_kwargs(self._config.engine_kwargs)
        if unknown:
            raise EngineError(f"unknown vLLM engine_kwargs: {', '.join(unknown)}")
        kwargs = dict(self._config.engine_kwargs)
        kwargs["model"] = resolve_model_path(kwargs.get("model") or self._config.model)
        kwargs.setdefault("served_model_name", [self._config.name])
        kwargs.setdefault("disable_log_stats", True)
        try:
            self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        except Exception as exc:
            raise EngineError(f"vLLM failed to start: {type(exc).__name__}: {exc}") from exc
        model_config = self._llm.model_config
        self._max_model_len = int(model_config.max_model_len)
        self._defaults = model_config.get_diff_sampling_param()

    def _sampling_params(self, request: EngineRequest, prompt_tokens: int) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        s = request.sampling
        room = self._max_model_len - prompt_tokens
        if room <= 0 or (s.max_tokens is not None and s.max_tokens > room):
            raise PromptTooLong(prompt_tokens, s.max_tokens, self._max_model_len)
        defaults = self._defaults
        params: dict[str, Any] = {
            "n": s.n,
            "max_tokens": s.max_tokens if s.max_tokens is not None else room,
            "temperature": s.temperature if s.temperature is not None
            else defaults.get("temperature", 1.0),
            "top_p": s.top_p if s.top_p is not None else defaults.get("top_p", 1.0),
            "presence_penalty": s.presence_penalty if s.presence_penalty is not None
            else defaults.get("presence_penalty", 0.0),
            "frequency_penalty": s.frequency_penalty if s.frequency_penalty is not None
            else defaults.get("frequency_penalty", 0.0),
            "stop": list(s.stop) or None,
            "seed": s.seed,
            "min_tokens": s.min_tokens,
            "ignore_eos": s.ignore_eos,
            "output_kind": RequestOutputKind.DELTA,
        }
        for key in ("top_k", "min_p", "repetition_penalty"):
            value = getattr(s, key)
            if value is not None:
                params[key] = value
            elif key in defaults:
                params[key] = defaults[key]
        try:
            return SamplingParams(**params)
        except (ValueError, TypeError, _client_error()) as exc:  # vLLM's own validation
            raise InvalidRequest(str(exc), getattr(exc, "parameter", None)) from None

    async def _render(self, llm: AsyncLLM, request: EngineRequest) -> Any:
        from vllm.renderers.params import ChatParams, TokenizeParams

        renderer = llm.renderer
        if request.prompt is not None:
            tok = TokenizeParams(max_total_tokens=None, add_special_tokens=True)
            (prompt,) = await renderer.render_cmpl_async([{"prompt": request.prompt}], tok)
            return prompt
        tok = TokenizeParams(max_total_tokens=None, add_special_tokens=False)
        params = ChatParams(chat_template_kwargs={"add_generation_prompt": True,
                                                  "continue_final_message": False})
        _, (prompt,) = await renderer.render_chat_async([list(request.messages)], params, tok)
        return prompt

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        llm = self._require()
        if llm.errored:
            raise EngineError(f"model {self._config.name}: engine died")
        prompt = await self._render(llm, request)
        prompt_tokens = len(prompt["prompt_token_ids"])
        params = self._sampling_params(request, prompt_tokens)
        try:
            async for out in llm.generate(prompt, params, request.request_id):
                for completion in out.outputs:
                    yield EngineOutput(
                        index=completion.index,
                        text=completion.text,
                        num_tokens=len(completion.token_ids),
                        prompt_tokens=prompt_tokens,
                        finish_reason=completion.finish_reason,
                    )
        except _client_error() as exc:  # the request itself was refused (a client error)
            raise InvalidRequest(str(exc), getattr(exc, "parameter", None)) from None

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    def num_unfinished(self) -> int:
        return 0 if self._llm is None else self._llm.get_num_unfinished_requests()

    async def check_health(self) -> None:
        llm = self._require()
        try:
            await llm.check_health()
        except Exception as exc:
            raise EngineError(f"model {self._config.name}: engine unhealthy: {exc}") from exc

    async def kv_capacity_tokens(self) -> int:
        cache = self._require().vllm_config.cache_config
        return int((cache.num_gpu_blocks or 0) * cache.block_size)

    async def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            # Stop reading outputs first, so the engine's exit is not reported as a crash.
            if llm.output_handler is not None:
                llm.output_handler.cancel()
            # AsyncLLM.shutdown joins the EngineCore process; keep the event loop free meanwhile.
            await asyncio.to_thread(llm.shutdown)
