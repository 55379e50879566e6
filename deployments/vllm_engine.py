"""The real engine: vLLM's AsyncLLM in the model replica, served by vLLM's own OpenAI app.

As Ray Serve LLM's vLLM engine does (ray/llm/_internal/serve/engines/vllm/vllm_engine.py), the
replica builds vLLM's OpenAI serving objects with `init_app_state` and vLLM's FastAPI app with
`build_app`; requests run through that app in-process (deployments/asgi.py), so chat,
completions, responses, tokenize/detokenize, embeddings (a pooling model), tools, structured
outputs, logprobs and reasoning parsers behave exactly as on `vllm serve`.

The one difference: the serving objects get an engine client that asks the replica's gate
before each generation reaches the engine (`_GatedClient`), with the prompt as vLLM rendered and
tokenized it, so admission counts every prompt once, exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import types
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from deployments.asgi import AsgiApp
from deployments.engine import EngineError, Gate
from serve_app.config import ModelConfig
from serve_app.local_models import resolve_model_path

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger("ray.serve.roundhouse")  # Serve's replica log files

# Engine settings Roundhouse owns: vLLM must not log prompts unless an operator opts in
# through openai.frontend_kwargs; the served name is the model's name.
_RESERVED_ENGINE_KWARGS = frozenset({"enable_log_requests", "served_model_name"})
# Flags of vLLM's OpenAI server that a model may set through openai.frontend_kwargs: the
# serving behaviour. The server's own (host, port, api_key, ssl, CORS, middleware, docs,
# uvicorn, data-parallel supervision, scale-out endpoints) belong to Roundhouse's gateway.
_FRONTEND_PASSTHROUGH = frozenset({
    "lora_modules", "trust_request_chat_template", "trust_request_mm_kwargs",
    "default_chat_template_kwargs", "return_tokens_as_token_ids",
    "exclude_tools_when_tool_choice_none", "tool_parser_plugin", "tool_strict_level",
    "tool_server", "max_log_len", "enable_prompt_tokens_details", "enable_force_include_usage",
    "enable_tokenizer_info_endpoint", "enable_log_outputs", "enable_log_deltas",
    "log_error_stack", "fingerprint_mode", "fingerprint_value", "sse_keep_alive_interval",
})
# OpenAIServingConfig fields that are flags of vLLM's OpenAI server under the same name.
_FRONTEND_FIELDS = ("enable_auto_tool_choice", "tool_call_parser", "chat_template",
                    "chat_template_content_format", "response_role")


def _vllm_installed() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def _engine_kwargs(config: ModelConfig) -> dict[str, Any]:
    """AsyncEngineArgs for a model: its engine_kwargs, its path, its served name, and the
    structured-outputs settings of its `openai` block."""
    kwargs = dict(config.engine_kwargs)
    kwargs["model"] = resolve_model_path(kwargs.get("model") or config.model)
    kwargs["served_model_name"] = [config.name]
    kwargs.setdefault("disable_log_stats", True)
    structured = dict(kwargs.get("structured_outputs_config") or {})
    if config.openai.reasoning_parser:
        structured["reasoning_parser"] = config.openai.reasoning_parser
    if config.openai.structured_outputs_backend:
        structured["backend"] = config.openai.structured_outputs_backend
    if structured:
        kwargs["structured_outputs_config"] = structured
    return _normalize(kwargs)


def _normalize(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Nested config dicts as vLLM's CLI parser makes them (Ray Serve LLM does the same)."""
    import typing

    from pydantic import TypeAdapter
    from vllm.engine.arg_utils import AsyncEngineArgs

    fields = {f.name: f for f in dataclasses.fields(AsyncEngineArgs)}
    out = dict(kwargs)
    for key, value in kwargs.items():
        field = fields.get(key)
        if field is None or not isinstance(value, dict):
            continue
        annotation = field.type
        candidates = [annotation, *typing.get_args(annotation)]
        config_type = next((c for c in candidates
                            if isinstance(c, type) and dataclasses.is_dataclass(c)), None)
        if config_type is not None:
            out[key] = TypeAdapter(config_type).validate_python(value)
    return out


def _frontend_args(config: ModelConfig) -> Any:
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    settings = config.openai
    kwargs = dict(settings.frontend_kwargs)
    kwargs.update({name: getattr(settings, name) for name in _FRONTEND_FIELDS})
    return FrontendArgs(**kwargs)


class VllmEngine:
    def __init__(self, config: ModelConfig) -> None:
        self._config = config
        self._llm: AsyncLLM | None = None
        self._app: AsgiApp | None = None
        self._max_model_len = 0

    @classmethod
    def config_problems(cls, config: ModelConfig) -> list[str]:
        """What is wrong with a model's settings for the installed vLLM (nothing is checked
        where vLLM is not installed, e.g. a laptop running `check-config`)."""
        problems = []
        if not config.model:
            problems.append("'model' (a path or model id) is required")
        settings = config.openai
        for key in settings.frontend_kwargs:
            if key in _FRONTEND_FIELDS:
                problems.append(f"openai.frontend_kwargs.{key}: set openai.{key} instead")
            elif key not in _FRONTEND_PASSTHROUGH:
                problems.append(f"openai.frontend_kwargs.{key}: not a serving setting a model "
                                f"may change; allowed: {', '.join(sorted(_FRONTEND_PASSTHROUGH))}")
        if not _vllm_installed():
            return problems
        from vllm.engine.arg_utils import AsyncEngineArgs

        known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        unknown = sorted(k for k in config.engine_kwargs
                         if k not in known or k in _RESERVED_ENGINE_KWARGS)
        if unknown:
            problems.append(f"unknown or reserved vLLM engine_kwargs: {', '.join(unknown)}")
        problems += _parser_problems(config)
        return problems

    @property
    def app(self) -> AsgiApp:
        if self._app is None:
            raise EngineError(f"model {self._config.name}: engine is not running")
        return self._app

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def _require(self) -> AsyncLLM:
        if self._llm is None:
            raise EngineError(f"model {self._config.name}: engine is not running")
        return self._llm

    async def start(self, gate: Gate) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        problems = self.config_problems(self._config)
        if problems:
            raise EngineError("; ".join(problems))
        try:
            engine_args = AsyncEngineArgs(**_engine_kwargs(self._config))
            self._llm = AsyncLLM.from_engine_args(
                engine_args, usage_context=UsageContext.OPENAI_API_SERVER)
            self._app = await self._build_app(self._llm, engine_args, gate)
        except Exception as exc:
            raise EngineError(f"vLLM failed to start: {type(exc).__name__}: {exc}") from exc
        self._max_model_len = int(self._llm.model_config.max_model_len)

    async def _build_app(self, llm: AsyncLLM, engine_args: Any, gate: Gate) -> AsgiApp:
        """vLLM's OpenAI server app over `llm`, as `vllm serve` builds it."""
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app
        from vllm.entrypoints.launchers.launcher import validate_api_server_args

        args = argparse.Namespace(**(vars(_frontend_args(self._config)) | vars(engine_args)))
        validate_api_server_args(args)  # type: ignore[no-untyped-call]
        tasks = await llm.get_supported_tasks()
        state = State()
        client: Any = _GatedClient(llm, gate)  # an EngineClient by delegation
        await init_app_state(client, state, args, supported_tasks=tasks)
        app = build_app(args, supported_tasks=tasks, model_config=llm.model_config)
        app.state._state.update(state._state)
        # vLLM's engine-error handler flips `should_exit` on the uvicorn server it expects
        # here; there is none (Serve's health check replaces a dead replica).
        app.state.server = types.SimpleNamespace()
        return app

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
        llm, self._llm, self._app = self._llm, None, None
        if llm is not None:
            # Stop reading outputs first, so the engine's exit is not reported as a crash.
            if llm.output_handler is not None:
                llm.output_handler.cancel()
            # AsyncLLM.shutdown joins the EngineCore process; keep the event loop free meanwhile.
            await asyncio.to_thread(llm.shutdown)


def _parser_problems(config: ModelConfig) -> list[str]:
    settings = config.openai
    problems = []
    if settings.tool_call_parser:
        from vllm.tool_parsers import ToolParserManager

        known = ToolParserManager.list_registered()
        if settings.tool_call_parser not in known:
            problems.append(f"openai.tool_call_parser {settings.tool_call_parser!r} is not one "
                            f"of vLLM's: {', '.join(sorted(known))}")
    if settings.reasoning_parser:
        from vllm.reasoning import ReasoningParserManager

        known = ReasoningParserManager.list_registered()
        if settings.reasoning_parser not in known:
            problems.append(f"openai.reasoning_parser {settings.reasoning_parser!r} is not one "
                            f"of vLLM's: {', '.join(sorted(known))}")
    if settings.structured_outputs_backend:
        from typing import get_args

        from vllm.config import StructuredOutputsConfig

        backends = get_args(StructuredOutputsConfig.__dataclass_fields__["backend"].type)
        if backends and settings.structured_outputs_backend not in backends:
            problems.append(f"openai.structured_outputs_backend "
                            f"{settings.structured_outputs_backend!r} is not one of "
                            f"{', '.join(backends)}")
    if settings.chat_template:
        from vllm.renderers.chat_utils import load_chat_template

        try:
            load_chat_template(settings.chat_template)
        except Exception as exc:
            problems.append(f"openai.chat_template: {exc}")
    return problems


class _GatedClient:
    """vLLM's engine client as the serving objects see it, with the replica's gate in front of
    every request: `generate` (and `encode`, for pooling models) reserve before they submit."""

    def __init__(self, llm: AsyncLLM, gate: Gate) -> None:
        self._llm = llm
        self._gate = gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def _prompt_tokens(self, prompt: Any) -> int:
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt_token_ids"), list):
            return len(prompt["prompt_token_ids"])
        from vllm.renderers.inputs.preprocess import extract_prompt_len

        return int(extract_prompt_len(self._llm.model_config, prompt))

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str,
                       **kwargs: Any) -> AsyncIterator[Any]:
        from vllm.sampling_params import RequestOutputKind

        asked = sampling_params.max_tokens
        prompt_tokens = self._prompt_tokens(prompt)
        limit = asked if asked is not None else self._llm.model_config.max_model_len - prompt_tokens
        async with self._gate.generation(request_id, prompt_tokens, limit,
                                         sampling_params.n) as generation:
            if asked is None or generation.max_tokens < asked:
                sampling_params.max_tokens = generation.max_tokens
            cumulative = sampling_params.output_kind != RequestOutputKind.DELTA
            async for out in self._llm.generate(prompt, sampling_params, request_id, **kwargs):
                for completion in out.outputs:
                    generation.produced(completion.index, len(completion.token_ids),
                                        cumulative)
                yield out

    async def encode(self, prompt: Any, pooling_params: Any, request_id: str,
                     *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async with self._gate.generation(request_id, self._prompt_tokens(prompt), 0, 1):
            async for out in self._llm.encode(prompt, pooling_params, request_id,
                                              *args, **kwargs):
                yield out
