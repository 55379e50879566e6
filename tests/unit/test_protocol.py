from __future__ import annotations

import pickle
from typing import Any

import pytest
from pydantic import ValidationError

from serve_app.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Usage,
    call_from_chat,
    call_from_completion,
    chat_chunk,
    full_response,
    usage_chunk,
)


def chat(**extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], **extra}


def test_chat_defaults() -> None:
    req = ChatCompletionRequest.model_validate(chat())
    assert req.model == "auto" and req.n == 1 and not req.stream
    assert req.output_limit() is None


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    req = ChatCompletionRequest.model_validate(chat(max_tokens=5, max_completion_tokens=9))
    assert req.output_limit() == 9


def test_text_parts_are_joined() -> None:
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    call = call_from_chat(req, "chat", "r1")
    assert call.messages == ({"role": "user", "content": "ab"},)


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    chat(stop=[""]),
    {"messages": [{"role": "user"}]},
    chat(stream_options={"include_usage": True}),
    chat(tools=[{"type": "function"}]),
    chat(response_format={"type": "json_object"}),
    chat(presence_penalty=3),
    chat(n=17),
])
def test_chat_rejects(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_unknown_fields_are_ignored() -> None:
    req = ChatCompletionRequest.model_validate(chat(future_knob=1))
    assert not hasattr(req, "future_knob")


def test_completion_defaults_and_batch() -> None:
    req = CompletionRequest.model_validate({"prompt": ["a", "b"], "stop": "x"})
    assert req.max_tokens == 16  # OpenAI's default for /v1/completions
    call = call_from_completion(req, "code", "r2")
    assert call.prompts == ("a", "b") and call.sampling.stop == ("x",)


@pytest.mark.parametrize("body", [{"prompt": []}, {"prompt": "a", "echo": True},
                                  {"prompt": "a", "logprobs": 2}, {"prompt": 5},
                                  {"prompt": "a", "best_of": 3}])
def test_completion_rejects(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate(body)


def test_generate_call_pickles() -> None:
    req = ChatCompletionRequest.model_validate(chat(stream=True, stream_options={
        "include_usage": True}, temperature=0.5, seed=3))
    call = call_from_chat(req, "chat", "r3")
    again = pickle.loads(pickle.dumps(call))
    assert again == call and again.include_usage and again.sampling.seed == 3


def test_response_shapes() -> None:
    usage = Usage(prompt_tokens=3, completion_tokens=4)
    body = full_response("id", 1, "chat", "chat", [("hello", "stop")], usage)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    chunk = chat_chunk("id", 1, "chat", 0, {"content": "x"}, None, with_usage_field=True)
    assert chunk["usage"] is None and chunk["object"] == "chat.completion.chunk"
    assert "usage" not in chat_chunk("id", 1, "chat", 0, {}, None, with_usage_field=False)
    last = usage_chunk("id", 1, "code", "completions", usage)
    assert last["choices"] == [] and last["object"] == "text_completion"
