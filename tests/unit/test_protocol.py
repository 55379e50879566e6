"""What the ingress reads of a request (its routing view) and what crosses Ray to a replica."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from serve_app.config import ModelLimits
from serve_app.errors import BadRequest
from serve_app.protocol import ForwardedRequest, Reply, StreamEnd, StreamHead, Usage
from serve_app.router import content_text, parse_body, route_input, routing_view


def test_text_parts_are_joined_with_newlines_as_vllm_does() -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "image_url", "image_url": {"url": "x"}},
             {"type": "text", "text": "second"}]
    assert content_text(parts) == "first\nsecond"
    assert content_text("plain") == "plain" and content_text(None) == ""


def test_chat_view_keeps_roles_and_reads_only_what_routing_needs() -> None:
    body = {"model": "auto", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        {"role": "tool", "tool_call_id": "1", "content": "42"},
        {"role": "user", "content": [{"type": "text", "text": "and now?"}]}],
        "tools": [{"type": "function", "function": {"name": "f"}}], "temperature": 99}
    view = routing_view(body, "/v1/chat/completions")
    assert view.endpoint == "chat" and view.model == "auto"
    assert view.messages == (("system", "be brief"), ("assistant", ""), ("tool", "42"),
                             ("user", "and now?"))


def test_responses_view_reads_input_and_instructions() -> None:
    view = routing_view({"input": "hi", "instructions": "sys"}, "/v1/responses")
    assert view.messages == (("system", "sys"), ("user", "hi"))
    items = [{"role": "user", "content": [{"type": "input_text", "text": "q"}]},
             {"type": "function_call_output", "call_id": "c", "output": "x"}]
    assert routing_view({"input": items}, "/v1/responses").messages == (("user", "q"),)


def test_completions_view_reads_the_first_prompts() -> None:
    view = routing_view({"prompt": [f"p{i}" for i in range(10)]}, "/v1/completions")
    assert view.endpoint == "completions" and len(view.messages) == 4


@pytest.mark.parametrize("body,param", [
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [5]}, "messages.0"),
    ({"messages": [{"content": "x"}]}, "messages.0.role"),
    ({"model": 3, "messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"messages": [{"role": "user", "content": "x"}], "metadata": "high"}, "metadata"),
])
def test_shapes_routing_cannot_read_are_400(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as exc:
        routing_view(body, "/v1/chat/completions")
    assert exc.value.param == param


def test_quality_comes_from_the_header_before_metadata() -> None:
    view = parse_body({"messages": [{"role": "user", "content": "x"}],
                       "metadata": {"quality": "HIGH"}})
    assert route_input(view).quality == "high"
    assert route_input(view, "standard").quality == "standard"
    with pytest.raises(BadRequest):
        route_input(view, "max")


def test_what_crosses_ray_pickles() -> None:
    items = [ForwardedRequest("/v1/chat/completions", {"model": "chat"}, "r",
                              ModelLimits(max_output_tokens=5)),
             Reply(200, "application/json", b"{}", Usage(1, 2)),
             StreamHead(200, "text/event-stream", b"data: x\n\n"), StreamEnd(b"", Usage(3, 4))]
    assert [pickle.loads(pickle.dumps(i)) for i in items] == items
    assert Usage(3, 4).total_tokens == 7


def test_the_ingress_sees_paths_without_its_route_prefix() -> None:
    from starlette.requests import Request

    from serve_app.ingress import _path

    def path(raw: str, root: str = "") -> str:
        return _path(Request({"type": "http", "path": raw, "root_path": root, "headers": []}))

    assert path("/v1/chat/completions") == "/v1/chat/completions"
    assert path("/rh/v1/chat/completions", "/rh") == "/v1/chat/completions"
    assert path("/rh", "/rh") == "/" and path("/v1/models/") == "/v1/models"
