"""Between requests and `policy.routing`: the router of a config, and a request's routing input.

Shared by the ingress, the `/v1/route` dry run and `roundhouse route`, so all three decide the
same way. Imports no Ray, so the CLI stays light.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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

QUALITY_HEADER = "x-roundhouse-quality"
_METADATA_KEYS = ("quality", "roundhouse_quality")
# The endpoints that `auto` routing reads, and the kind of body each has.
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
             "/v1/responses": "responses", "chat": "chat", "completions": "completions",
             "responses": "responses"}
# Completions prompts read for routing (a batch may hold many; the first few say enough).
_MAX_PROMPTS = 4


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


@dataclass(frozen=True)
class RoutingView:
    """What routing reads of a request body: nothing else of it is validated here (the
    engine validates the whole request, with its own messages)."""

    endpoint: str  # "chat" | "completions" (the Responses API reads as chat)
    model: str
    messages: tuple[tuple[str, str], ...]
    metadata: Mapping[str, Any] | None = None


def content_text(content: Any) -> str:
    """A message's text as the engine's chat template sees it: a string, or its text parts
    joined with newlines (as vLLM joins them); other parts (images, audio) carry none."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part["text"] for part in content
                         if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def _messages(items: Any, param: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(items, list) or not items:
        raise BadRequest(f"{param} must be a non-empty list of messages", param=param)
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadRequest(f"{param}.{i} must be an object with a role and content",
                             param=f"{param}.{i}")
        role = item.get("role")
        if role is None and param == "input":  # a Responses item that is not a message
            continue
        if not isinstance(role, str):
            raise BadRequest(f"{param}.{i}.role must be a string", param=f"{param}.{i}.role")
        out.append((role, content_text(item.get("content"))))
    return tuple(out)


def routing_view(body: Mapping[str, Any], endpoint: str) -> RoutingView:
    """Reads `model`, the text and `metadata` of a chat, completions or Responses body;
    a body whose shape routing cannot read is a 400 (it would be one from the engine too)."""
    model = body.get("model")
    if model is None or model == "":
        model = AUTO
    elif not isinstance(model, str):
        raise BadRequest("model must be a string", param="model")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise BadRequest("metadata must be an object", param="metadata")
    kind = ENDPOINTS[endpoint]
    if kind == "chat":
        return RoutingView("chat", model, _messages(body.get("messages"), "messages"), metadata)
    if kind == "responses":
        given = body.get("input")
        messages = (("user", given),) if isinstance(given, str) else _messages(given, "input")
        instructions = body.get("instructions")
        if isinstance(instructions, str) and instructions:
            messages = (("system", instructions), *messages)
        return RoutingView("chat", model, messages, metadata)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts:
        raise BadRequest("prompt must be a string or a non-empty list", param="prompt")
    texts = tuple(("user", p) for p in prompts[:_MAX_PROMPTS] if isinstance(p, str))
    return RoutingView("completions", model, texts, metadata)


def route_input(view: RoutingView, quality_header: str | None = None) -> RouteInput:
    """The routing input of a request; the header's quality wins over metadata's."""
    quality = _quality(quality_header, "X-Roundhouse-Quality") if quality_header else None
    if quality is None and view.metadata:
        for key in _METADATA_KEYS:
            if key in view.metadata:
                quality = _quality(view.metadata[key], f"metadata.{key}")
                break
    return RouteInput(endpoint=view.endpoint, model=view.model, quality=quality,
                      messages=view.messages)


def decide(router: Router, inp: RouteInput) -> RouteDecision:
    try:
        return router.decide(inp)
    except UnknownModel as exc:
        raise ModelNotFound(str(exc), param="model") from None


def parse_body(body: Mapping[str, Any], endpoint: str | None = None) -> RoutingView:
    """The routing view of a body for `endpoint` (a path or chat/completions/responses;
    None: told by `messages`, `prompt` or `input`)."""
    if endpoint and endpoint not in ENDPOINTS:
        raise BadRequest(f"unknown endpoint {endpoint!r}; use /v1/chat/completions, "
                         "/v1/completions or /v1/responses", param="endpoint")
    if not endpoint:
        if "messages" in body:
            endpoint = "chat"
        elif "prompt" in body:
            endpoint = "completions"
        elif "input" in body:
            endpoint = "responses"
        else:
            raise BadRequest("cannot tell the endpoint: the body has neither 'messages', "
                             "'prompt' nor 'input'", param="messages")
    return routing_view(body, endpoint)


def decide_body(
    router: Router, body: Mapping[str, Any], endpoint: str | None = None,
    quality_header: str | None = None,
) -> RouteDecision:
    """The decision the server would take for this body, without generating anything."""
    return decide(router, route_input(parse_body(body, endpoint), quality_header))
