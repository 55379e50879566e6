"""Between requests and `policy.routing`: the router of a config, and a request's routing input.

Shared by the ingress, the `/v1/route` dry run and `roundhouse route`, so all three decide the
same way. Imports no Ray, so the CLI stays light.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from serve_app.config import AppConfig, ConfigError
from serve_app.errors import BadRequest, ModelNotFound
from serve_app.policy.classifier import ModelError, load_model
from serve_app.policy.routing import (
    AUTO,
    QUALITY_LEVELS,
    RouteDecision,
    RouteInput,
    Router,
    UnknownModel,
    rules_from_config,
)
from serve_app.protocol import ChatCompletionRequest, CompletionRequest, validation_message

QUALITY_HEADER = "x-roundhouse-quality"
_METADATA_KEYS = ("quality", "roundhouse_quality")
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
             "chat": "chat", "completions": "completions"}


def build_router(config: AppConfig) -> Router:
    """The router of a config; its classifier model file is loaded (and checked) here, so a
    missing or invalid `routing.classifier.path` fails the deploy with ConfigError."""
    names = config.lookup()
    rules = rules_from_config(
        [r.model_dump(exclude_none=True) for r in config.routing.rules], names)
    fallbacks = {names[k]: names[v] for k, v in config.routing.fallbacks.items()}
    settings = config.routing.classifier
    classifier = None
    if settings.enabled:
        try:
            classifier = load_model(settings.path)
        except ModelError as exc:
            raise ConfigError(f"invalid Roundhouse config: routing.classifier.path: {exc}"
                              ) from None
    return Router(rules, config.default, names, fallbacks, classifier,
                  settings.min_confidence)


def _quality(value: Any, where: str) -> str | None:
    if value is None:
        return None
    level = str(value).strip().lower()
    if level not in QUALITY_LEVELS:
        raise BadRequest(f"{where} must be one of {', '.join(QUALITY_LEVELS)}, got "
                         f"{str(value)[:40]!r}", param=where)
    return level


def route_input(
    parsed: ChatCompletionRequest | CompletionRequest, quality_header: str | None = None
) -> RouteInput:
    """The routing view of a validated request; the header's quality wins over metadata's."""
    quality = _quality(quality_header, "X-Roundhouse-Quality") if quality_header else None
    if quality is None and parsed.metadata:
        for key in _METADATA_KEYS:
            if key in parsed.metadata:
                quality = _quality(parsed.metadata[key], f"metadata.{key}")
                break
    if isinstance(parsed, ChatCompletionRequest):
        messages = tuple((m.role, m.text()) for m in parsed.messages)
        endpoint = "chat"
    else:
        messages = tuple(("user", p) for p in parsed.prompts()[:4])
        endpoint = "completions"
    return RouteInput(endpoint=endpoint, model=parsed.model or AUTO, quality=quality,
                      messages=messages)


def decide(router: Router, inp: RouteInput) -> RouteDecision:
    try:
        return router.decide(inp)
    except UnknownModel as exc:
        raise ModelNotFound(str(exc), param="model") from None


def parse_body(
    body: Mapping[str, Any], endpoint: str | None = None
) -> ChatCompletionRequest | CompletionRequest:
    """Validates a request body for `endpoint` (a path or chat/completions; None: inferred from
    `messages` or `prompt`)."""
    kind = ENDPOINTS.get(endpoint) if endpoint else None
    if endpoint and kind is None:
        raise BadRequest(f"unknown endpoint {endpoint!r}; use /v1/chat/completions or "
                         "/v1/completions", param="endpoint")
    if kind is None:
        if "messages" in body:
            kind = "chat"
        elif "prompt" in body:
            kind = "completions"
        else:
            raise BadRequest("cannot tell the endpoint: the body has neither 'messages' nor "
                             "'prompt'", param="messages")
    schema = ChatCompletionRequest if kind == "chat" else CompletionRequest
    try:
        return schema.model_validate(dict(body))
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise BadRequest(message, param=param) from None


def decide_body(
    router: Router, body: Mapping[str, Any], endpoint: str | None = None,
    quality_header: str | None = None,
) -> RouteDecision:
    """The decision the server would take for this body, without generating anything."""
    return decide(router, route_input(parse_body(body, endpoint), quality_header))
