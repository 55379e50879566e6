"""The application's arguments (the `args:` block of a Serve config), validated with pydantic.

Everything is `extra="forbid"`: a misspelt key in a YAML file must fail the deploy with a message
that names it, not be silently ignored.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serve_app.policy.residency import ModelSpec, check_memory_plan

MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelLimits(_Strict):
    """Per-model output caps and admission (see serve_app/policy/admission.py)."""

    # KV-budget admission in the model replica (false: requests go straight to the engine,
    # which queues and preempts on its own; for comparison, see benchmarks/spike.py).
    admission: bool = True
    # Used as max_tokens when a request sets none. None: the rest of the context window.
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    # A request asking for more than max_output_tokens: 400 (false) or capped to it (true).
    clamp_max_tokens: bool = False
    # Share of the engine's real KV cache that admitted requests may reserve.
    kv_budget_fraction: Annotated[float, Field(gt=0, le=1)] = 1.0
    # A request reserving more KV tokens than this is "large"; None: 1/16 of the KV budget.
    large_request_tokens: Annotated[int, Field(ge=1)] | None = None
    # Large requests together may hold at most this share of the budget (one always may), so
    # the rest stays for ordinary ones; 1.0: no limit.
    large_request_share: Annotated[float, Field(gt=0, le=1)] = 0.5
    # Requests waiting for KV room; more get 429 with Retry-After.
    max_queued_requests: Annotated[int, Field(ge=0)] = 64
    # A request that waited this long for KV room gets 429 with Retry-After.
    queue_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    # Generation running longer than this is aborted in the engine; the client gets 504.
    request_timeout_s: Annotated[float, Field(gt=0)] | None = 600.0


class OpenAIServingConfig(_Strict):
    """Per-model settings of the engine's OpenAI serving layer: what vLLM's own server takes as
    command-line flags (`vllm serve --tool-call-parser ...`), checked against the installed
    vLLM at deploy time (`roundhouse check-config` too)."""

    # `tool_choice: "auto"` needs both; named and `required` tool choices work without them
    # (vLLM forces valid arguments with structured outputs).
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None  # e.g. llama3_json, hermes, mistral
    # Splits a reasoning model's thinking into `reasoning_content` (e.g. deepseek_r1, qwen3).
    reasoning_parser: str | None = None
    # A Jinja template (a file path or the template itself) instead of the model's own.
    chat_template: str | None = None
    chat_template_content_format: Literal["auto", "string", "openai"] = "auto"
    response_role: str = "assistant"
    # The structured-outputs backend (json_schema, tools): auto, xgrammar, guidance, outlines.
    structured_outputs_backend: str | None = None
    # Any other flag of vLLM's OpenAI server (its FrontendArgs), by field name; server-level
    # flags (host, port, api_key, ssl, middleware, ...) belong to Roundhouse and are refused.
    frontend_kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_tools(self) -> OpenAIServingConfig:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("enable_auto_tool_choice needs tool_call_parser")
        return self


class ModelConfig(_Strict):
    name: Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
    # A local path, a name under ROUNDHOUSE_MODELS_DIR (see `roundhouse prepare-models`), or a
    # model id that vLLM resolves itself.
    model: str = ""
    # Passed to vLLM's AsyncEngineArgs unchanged (max_model_len, enforce_eager, dtype,
    # gpu_memory_utilization, quantization, ...); checked against its fields at build time.
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    # The OpenAI serving layer's settings (tool and reasoning parsers, chat template, ...).
    openai: OpenAIServingConfig = Field(default_factory=OpenAIServingConfig)
    # Environment of the model's replica process (VLLM_CPU_KVCACHE_SPACE, ...).
    env: dict[str, str] = Field(default_factory=dict)
    aliases: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(default_factory=list)
    num_gpus: Annotated[float, Field(ge=0, le=1)] = 0.0
    memory_gib: Annotated[float, Field(gt=0)] = 1.0
    # Pinned: loaded at deploy and never evicted. Preload: loaded at deploy, evictable later.
    pinned: bool = False
    preload: bool = False
    max_ongoing_requests: Annotated[int, Field(ge=1)] = 256
    # Engine start (weights, KV allocation, warm-up) must finish within this.
    start_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    # A streamed response crosses Ray in batches: after the first bytes (sent at once), what
    # the engine produced in this interval goes as one message. 0: every chunk on its own.
    stream_batch_ms: Annotated[float, Field(ge=0, le=1000)] = 10.0
    limits: ModelLimits = Field(default_factory=ModelLimits)


class ResidencyConfig(_Strict):
    """How the controller shares accelerator memory between models (see serve_app/controller.py)."""

    # The memory budget the models share, in GiB: the GPU's memory on a GPU host, the RAM set
    # aside for engines on a CPU host. None: every model fits at once (nothing is evicted).
    gpu_memory_gib: Annotated[float, Field(gt=0)] | None = None
    # Requests allowed to wait for one model to load; more get 503 with Retry-After.
    max_waiting_requests: Annotated[int, Field(ge=0)] = 64
    # How long a request waits for its model to become ready (eviction + load) before a 503.
    load_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    # How long an evicted model's in-flight requests may run before it is stopped anyway.
    drain_timeout_s: Annotated[float, Field(ge=0)] = 30.0
    # How long to wait for an evicted model's memory to be really free before loading another.
    memory_probe_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    # Stop an on-demand model nobody asked for in this long. None: keep it until evicted.
    idle_timeout_s: Annotated[float, Field(gt=0)] | None = None
    # A model that fails to load is retried after this, doubling per failure up to the maximum.
    failure_backoff_s: Annotated[float, Field(gt=0)] = 5.0
    max_failure_backoff_s: Annotated[float, Field(gt=0)] = 300.0
    # "Most requested" counts requests with this half-life.
    popularity_half_life_s: Annotated[float, Field(gt=0)] = 300.0


RULE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
# Rule names the router gives its own decisions.
RESERVED_RULE_NAMES = ("explicit", "default")


class RouteWhen(_Strict):
    """Conditions of one routing rule; all that are set must hold (see policy/routing.py)."""

    endpoint: Literal["chat", "completions"] | None = None
    quality: Literal["high", "standard"] | None = None
    code: bool | None = None
    # Detected code in one of these languages (python, javascript, typescript, go, rust, java,
    # kotlin, c, cpp, csharp, sql, shell, dockerfile, kubernetes, yaml, terraform, ...).
    languages: Annotated[list[str], Field(min_length=1)] | None = None
    reasoning: bool | None = None
    min_turns: Annotated[int, Field(ge=0)] | None = None
    max_turns: Annotated[int, Field(ge=0)] | None = None
    min_prompt_tokens: Annotated[int, Field(ge=0)] | None = None
    max_prompt_tokens: Annotated[int, Field(ge=0)] | None = None
    # Any of these words or phrases in the last user message / the system prompt
    # (whole words, case-insensitive).
    keywords: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        default_factory=list)
    system_keywords: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        default_factory=list)

    @model_validator(mode="after")
    def _check_languages(self) -> RouteWhen:
        from serve_app.policy.signals import KNOWN_LANGUAGES

        unknown = sorted(set(self.languages or ()) - KNOWN_LANGUAGES)
        if unknown:
            raise ValueError(f"unknown languages {unknown}; known: "
                             f"{', '.join(sorted(KNOWN_LANGUAGES))}")
        return self


class RouteRule(_Strict):
    name: Annotated[str, Field(pattern=RULE_NAME_PATTERN)]
    model: str
    when: RouteWhen = Field(default_factory=RouteWhen)


class ClassifierConfig(_Strict):
    """The learned part of routing: decides code / reasoning / chat when the high-precision
    signals are not sure (see serve_app/policy/classifier.py)."""

    enabled: bool = True
    # A model file written by `roundhouse route train`; None: the model shipped with Roundhouse.
    path: str | None = None
    # Below this confidence the classifier's verdict is not used (the default model serves).
    min_confidence: Annotated[float, Field(ge=0, le=1)] = 0.0


class RoutingConfig(_Strict):
    """Where `"model": "auto"` goes: rules in order, first match wins, then `default_model`."""

    rules: list[RouteRule] = Field(default_factory=list)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    # When a model is failed or cannot be loaded, serve its requests with this one instead.
    fallbacks: dict[str, str] = Field(default_factory=dict)


class IngressConfig(_Strict):
    max_body_bytes: Annotated[int, Field(ge=1024)] = DEFAULT_MAX_BODY_BYTES
    # Messages in one chat request, and characters of all messages or prompts together
    # (more: 400 before anything is tokenized).
    max_messages: Annotated[int, Field(ge=1)] = 2048
    max_input_chars: Annotated[int, Field(ge=1)] = 2_000_000
    max_ongoing_requests: Annotated[int, Field(ge=1)] = 1024
    num_replicas: Annotated[int, Field(ge=1)] = 1


class ApiKey(_Strict):
    """One API key, stored as the sha256 of the key (`roundhouse make-key` prints both)."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    # Status and admin endpoints need it.
    admin: bool = False
    # Model names or aliases the key may use; ["*"]: all.
    models: list[str] = Field(default_factory=lambda: ["*"])
    requests_per_minute: Annotated[int, Field(ge=1)] | None = None
    tokens_per_minute: Annotated[int, Field(ge=1)] | None = None


class AuthConfig(_Strict):
    """API keys, from any of: inline here, a YAML/JSON file (a list of keys, or {keys: [...]}),
    an environment variable holding such a JSON list. Auth is on when any source is named."""

    keys: list[ApiKey] = Field(default_factory=list)
    keys_file: str | None = None
    keys_env: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.keys) or self.keys_file is not None or self.keys_env is not None


class AppConfig(_Strict):
    models: Annotated[list[ModelConfig], Field(min_length=1)]
    # Where `"model": "auto"` (and a missing model) goes when no routing rule matches.
    default_model: str | None = None
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    residency: ResidencyConfig = Field(default_factory=ResidencyConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)

    @model_validator(mode="after")
    def _check_names(self) -> AppConfig:
        seen: dict[str, str] = {}
        for m in self.models:
            for name in (m.name, *m.aliases):
                if name == "auto":
                    raise ValueError("'auto' is reserved for routing; it cannot name a model")
                if name in seen:
                    raise ValueError(
                        f"name {name!r} is used by both model {seen[name]!r} and model {m.name!r}"
                    )
                seen[name] = m.name
        if self.default_model is not None and self.default_model not in {
            m.name for m in self.models
        }:
            raise ValueError(
                f"default_model {self.default_model!r} is not one of the models: "
                f"{', '.join(m.name for m in self.models)}"
            )
        self._check_routing(seen)
        self._check_keys(self.auth.keys, seen)
        return self

    @staticmethod
    def _check_keys(keys: list[ApiKey], names: dict[str, str]) -> None:
        seen: set[str] = set()
        for key in keys:
            if key.name in seen:
                raise ValueError(f"auth: key name {key.name!r} is used twice")
            seen.add(key.name)
            unknown = [m for m in key.models if m != "*" and m not in names]
            if unknown:
                raise ValueError(f"auth: key {key.name!r} names unknown models "
                                 f"{', '.join(unknown)}; known: {', '.join(names)}")

    def _check_routing(self, names: dict[str, str]) -> None:
        rule_names: set[str] = set()
        for rule in self.routing.rules:
            if rule.name in RESERVED_RULE_NAMES or rule.name in rule_names:
                raise ValueError(f"routing rule name {rule.name!r} is reserved or used twice")
            rule_names.add(rule.name)
            if rule.model not in names:
                raise ValueError(f"routing rule {rule.name!r}: model {rule.model!r} is not one "
                                 f"of the models or aliases: {', '.join(names)}")
        for source, target in self.routing.fallbacks.items():
            for name in (source, target):
                if name not in names:
                    raise ValueError(f"routing.fallbacks: {name!r} is not one of the models or "
                                     f"aliases: {', '.join(names)}")
            if names[source] == names[target]:
                raise ValueError(f"routing.fallbacks: {source!r} cannot fall back to itself")

    @property
    def budget_gib(self) -> float:
        budget = self.residency.gpu_memory_gib
        return budget if budget is not None else sum(m.memory_gib for m in self.models)

    @property
    def default(self) -> str:
        return self.default_model or self.models[0].name

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def lookup(self) -> dict[str, str]:
        """Every name a client may send in `model` (names and aliases) -> model name."""
        table = {m.name: m.name for m in self.models}
        for m in self.models:
            table.update({alias: m.name for alias in m.aliases})
        return table


class LiveConfig(_Strict):
    """What the ingress deployment's `user_config` (in the Serve config's `deployments:` list)
    may change on a running app: `serve deploy` applies it through Serve's reconfigure, with no
    replica or engine restarted. Each part replaces the one in `args`; `limits` entries override
    only the fields they name."""

    default_model: str | None = None
    routing: RoutingConfig | None = None
    auth: AuthConfig | None = None
    limits: dict[str, ModelLimits] = Field(default_factory=dict)


INGRESS_DEPLOYMENT = "ingress"


def apply_live(config: AppConfig, live: LiveConfig) -> AppConfig:
    """`config` with the live overrides; raises ValueError (naming the setting) if invalid."""
    data = config.model_dump()
    if live.default_model is not None:
        data["default_model"] = live.default_model
    if live.routing is not None:
        data["routing"] = live.routing.model_dump()
    if live.auth is not None:
        data["auth"] = live.auth.model_dump()
    models = {m["name"]: m for m in data["models"]}
    for name, limits in live.limits.items():
        if name not in models:
            raise ValueError(f"user_config.limits: {name!r} is not one of the models: "
                             f"{', '.join(models)}")
        models[name]["limits"] = {**models[name]["limits"],
                                  **limits.model_dump(exclude_unset=True)}
    return AppConfig.model_validate(data)


def deployment_name(model: str) -> str:
    return f"model-{model}"


class EngineSettings(_Strict):
    """What a model deployment's `user_config` (in the Serve config's `deployments:` list, under
    the model's deployment name, `model-<name>`) may change on a running app: `serve deploy`
    then restarts that model's engine in place, and no other model's. Each entry overrides the
    one in `args`, key by key; a null value removes the key (back to the engine's default)."""

    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    openai: dict[str, Any] = Field(default_factory=dict)
    env: dict[str, str | None] = Field(default_factory=dict)
    start_timeout_s: Annotated[float, Field(gt=0)] | None = None


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = {**base, **override}
    return {k: v for k, v in merged.items() if v is not None}


def apply_engine_settings(model: ModelConfig, user_config: dict[str, Any] | None) -> ModelConfig:
    """`model` with a model deployment's `user_config` applied; raises ValueError naming the
    setting when it is invalid."""
    if not user_config:
        return model
    try:
        settings = EngineSettings.model_validate(user_config)
    except ValidationError as exc:
        raise ValueError(_details(exc)) from None
    data = model.model_dump()
    data["engine_kwargs"] = _merge(data["engine_kwargs"], settings.engine_kwargs)
    data["openai"] = _merge(data["openai"], settings.openai)
    data["env"] = _merge(data["env"], settings.env)
    if settings.start_timeout_s is not None:
        data["start_timeout_s"] = settings.start_timeout_s
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        raise ValueError(_details(exc)) from None


# --- loading and checking a config ----------------------------------------------------------

# A Ray custom resource standing for accelerator memory on CPU hosts: when the cluster offers it
# (`make serve` starts Ray with it), each CPU model replica asks for its memory_gib of it, so Ray
# itself does not start a model before an evicted one has exited. On GPU hosts the fractional
# num_gpus does the same.
MEMORY_RESOURCE = "roundhouse_memory_mib"


def memory_mib(gib: float) -> int:
    """Ray wants whole resource quantities; MiB are fine-grained enough."""
    return int(math.ceil(gib * 1024))
# vLLM's gpu_memory_utilization and Ray's num_gpus are fractions of the same device.
_SHARE_TOLERANCE = 0.01


class ConfigError(ValueError):
    """The app args are invalid; the message says which setting and why."""


def _details(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'args'}: "
                     f"{str(err['msg']).removeprefix('Value error, ')}"
                     for err in exc.errors(include_url=False, include_input=False))


def parse_app_config(args: dict[str, Any], check_engine: bool = True,
                     engine: Any = None) -> AppConfig:
    """Validated app args. `check_engine` also has the engine class (`engine`; default vLLM's)
    check each model's engine settings against what is installed (slow to import; tools that
    only read the config skip it)."""
    try:
        config = AppConfig.model_validate(args)
    except ValidationError as exc:
        raise ConfigError(f"invalid Roundhouse config: {_details(exc)}") from None
    if check_engine:
        from deployments.engine import config_problems

        if engine is None:
            from deployments.vllm_engine import VllmEngine

            engine = VllmEngine
        for model in config.models:
            problems = config_problems(engine, model)
            if problems:
                raise ConfigError(f"invalid Roundhouse config: model {model.name!r}: "
                                  + "; ".join(problems))
    problems = memory_plan_problems(config)
    if problems:
        raise ConfigError("memory plan does not hold: " + "; ".join(problems))
    if check_engine and config.routing.classifier.enabled and config.routing.classifier.path:
        from serve_app.router import build_router

        build_router(config)  # loads the classifier's model file: ConfigError if it cannot
    return config


def memory_plan_problems(config: AppConfig) -> list[str]:
    """The memory plan, checked before anything starts: pinned models plus the largest on-demand
    model fit the budget, and on GPU each model's memory_gib, its Ray num_gpus share of the
    device and vLLM's gpu_memory_utilization say the same thing."""
    budget = config.budget_gib
    specs = {m.name: ModelSpec(m.name, m.memory_gib, m.pinned) for m in config.models}
    problems = check_memory_plan(specs, budget)
    on_gpu = [m for m in config.models if m.num_gpus > 0]
    if on_gpu and config.residency.gpu_memory_gib is None:
        problems.append("models use num_gpus, so residency.gpu_memory_gib (the device's "
                        "memory) must be set")
        return problems
    if on_gpu and len(on_gpu) != len(config.models):
        cpu = ", ".join(m.name for m in config.models if m.num_gpus == 0)
        problems.append(f"some models use num_gpus and others ({cpu}) do not; put all of them "
                        "on the accelerator or none")
    for m in on_gpu:
        share_gib = m.num_gpus * budget
        if abs(share_gib - m.memory_gib) > _SHARE_TOLERANCE * budget:
            problems.append(
                f"{m.name}: num_gpus {m.num_gpus} x {budget:.1f} GiB = {share_gib:.1f} GiB, but "
                f"memory_gib is {m.memory_gib:.1f} GiB; set num_gpus to "
                f"{m.memory_gib / budget:.3f}")
        util = m.engine_kwargs.get("gpu_memory_utilization")
        if util is None:
            problems.append(f"{m.name}: set engine_kwargs.gpu_memory_utilization to "
                            f"{m.num_gpus} (vLLM would take 90% of the device)")
        elif abs(float(util) - m.num_gpus) > _SHARE_TOLERANCE:
            problems.append(f"{m.name}: gpu_memory_utilization {util} differs from "
                            f"num_gpus {m.num_gpus}")
    return problems


def load_app_config(path: str | Path, app: str | None = None,
                    check_engine: bool = True) -> AppConfig:
    """The validated args of one application in a Serve config file."""
    document = yaml.safe_load(Path(path).read_text())
    apps = (document or {}).get("applications") or []
    if not apps:
        raise ConfigError(f"{path}: no applications")
    chosen = next((a for a in apps if app is None or a.get("name") == app), None)
    if chosen is None:
        raise ConfigError(f"{path}: no application named {app!r}")
    config = parse_app_config(chosen.get("args") or {}, check_engine)
    live = live_config(chosen)
    if live is not None:
        try:
            config = apply_live(config, live)
        except ValueError as exc:
            raise ConfigError(f"invalid Roundhouse config: the ingress user_config: "
                              f"{exc}") from None
    return _with_engine_settings(config, chosen, check_engine)


def _with_engine_settings(config: AppConfig, application: dict[str, Any],
                          check_engine: bool) -> AppConfig:
    """`config` with the engine settings of the model deployments' `user_config`s applied."""
    by_deployment = {deployment_name(m.name): m for m in config.models}
    models = {m.name: m for m in config.models}
    for deployment in application.get("deployments") or []:
        name = deployment.get("name")
        if name == INGRESS_DEPLOYMENT or not deployment.get("user_config"):
            continue
        if name not in by_deployment:
            raise ConfigError(f"invalid Roundhouse config: deployments: {name!r} has a "
                              "user_config but is not a deployment of this app (models are "
                              f"{', '.join(by_deployment)}, the ingress is "
                              f"{INGRESS_DEPLOYMENT!r})")
        model = by_deployment[name]
        try:
            models[model.name] = apply_engine_settings(model, deployment["user_config"])
        except ValueError as exc:
            raise ConfigError(f"invalid Roundhouse config: the user_config of {name}: "
                              f"{exc}") from None
    if all(models[m.name] is m for m in config.models):
        return config
    data = config.model_dump()
    data["models"] = [models[m.name].model_dump() for m in config.models]
    return parse_app_config(data, check_engine)


def live_config(application: dict[str, Any]) -> LiveConfig | None:
    """The ingress deployment's `user_config` in one application of a Serve config."""
    for deployment in application.get("deployments") or []:
        if deployment.get("name") == INGRESS_DEPLOYMENT and deployment.get("user_config"):
            try:
                return LiveConfig.model_validate(deployment["user_config"])
            except ValidationError as exc:
                raise ConfigError(f"invalid Roundhouse config: the ingress user_config: "
                                  f"{_details(exc)}") from None
    return None
