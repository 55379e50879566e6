"""Parity with vLLM's own OpenAI server: the same requests to `vllm serve` and to Roundhouse
(configs/local.yaml, the same model and flags), compared. Status, response shape and, for greedy
or seeded requests, the same text, tokens and logprobs. Only what differs by design is left out:
ids, timestamps, the config fingerprint, and the error body (ours has a string `code` and the
request id; the message is vLLM's)."""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import httpx
import jsonschema
import pytest

pytestmark = pytest.mark.e2e

VOLATILE = {"id", "created", "created_at", "system_fingerprint", "request_id"}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def normalized(value: Any) -> Any:
    """The value without what differs between two servers by design (ids, times)."""
    if isinstance(value, dict):
        return {k: normalized(v) for k, v in value.items() if k not in VOLATILE
                and not (k.endswith("_id") and isinstance(v, str))}
    if isinstance(value, list):
        return [normalized(v) for v in value]
    if isinstance(value, str) and value.startswith(("chatcmpl-tool-", "call_", "fc_", "msg_")):
        return "<id>"
    return value


def assert_close(ours: Any, theirs: Any, where: str = "") -> None:
    """Equal, floats to 1e-3 (logprobs of two engine processes, same numerics)."""
    if isinstance(theirs, float) and isinstance(ours, float):
        assert math.isclose(ours, theirs, abs_tol=1e-3), where
    elif isinstance(theirs, dict):
        assert isinstance(ours, dict) and ours.keys() == theirs.keys(), (where, ours, theirs)
        for key in theirs:
            assert_close(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), (where, ours, theirs)
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_close(a, b, f"{where}[{i}]")
    else:
        assert ours == theirs, (where, ours, theirs)


def unique(path: str, body: dict[str, Any]) -> dict[str, Any]:
    """`body` with a new first line, so neither server's prefix cache holds any of it: each
    comparison starts from the same (empty) cache state, whatever ran before it."""
    nonce = f"[session {uuid.uuid4().hex}]"
    if path == "/v1/chat/completions" and isinstance(body.get("messages"), list):
        return {**body, "messages": [{"role": "system", "content": nonce}, *body["messages"]]}
    if path == "/v1/completions" and isinstance(body.get("prompt"), str):
        return {**body, "prompt": f"{nonce}\n{body['prompt']}"}
    if path == "/v1/responses":
        return {**body, "instructions": nonce}
    return body


def both(reference_url: str, base_url: str, path: str, body: dict[str, Any]
         ) -> tuple[httpx.Response, httpx.Response]:
    body = unique(path, body)
    theirs = httpx.post(f"{reference_url}{path}", json=body, timeout=300)
    ours = httpx.post(f"{base_url}{path}", json=body, timeout=300)
    return ours, theirs


# A comparison of generated outputs that differs is repeated once, with a fresh prompt: two
# engine processes may break a near-tie between two tokens differently now and then (seen about
# once in 40 comparisons of long greedy outputs, in no fixed place), while anything Roundhouse
# changed in a request or a response would differ both times.
ATTEMPTS = 2


def same(reference_url: str, base_url: str, path: str, body: dict[str, Any]
         ) -> dict[str, Any]:
    """Sends `body` to both servers; asserts the same status and the same response; returns
    ours."""
    for attempt in range(1, ATTEMPTS + 1):
        ours, theirs = both(reference_url, base_url, path, body)
        assert ours.status_code == theirs.status_code, (ours.text, theirs.text)
        assert ours.headers["content-type"] == theirs.headers["content-type"]
        if ours.status_code >= 400:
            mine, vllm = ours.json()["error"], theirs.json()["error"]
            assert isinstance(mine["code"], str) and mine["request_id"]
            assert mine["message"] == vllm["message"] and mine["param"] == vllm["param"]
            return dict(ours.json())
        try:
            assert_close(normalized(ours.json()), normalized(theirs.json()))
        except AssertionError:
            if attempt == ATTEMPTS:
                raise
            continue
        return dict(ours.json())
    raise AssertionError("unreachable")


def sse(response: httpx.Response) -> list[Any]:
    events = []
    for block in response.text.split("\n\n"):
        data = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        if data:
            events.append(data[0] if data[0] == "[DONE]" else json.loads(data[0]))
    return events


_CONCATENATED = {"content", "reasoning_content", "reasoning", "text", "arguments", "delta"}


def _merge(into: dict[str, Any], part: dict[str, Any]) -> None:
    """Adds one event's (or delta's) fields to `into`: text concatenated, lists extended (tool
    calls and choices by their index), nulls never over a value, anything else the latest."""
    for key, value in part.items():
        if isinstance(value, str) and key in _CONCATENATED:
            into[key] = (into.get(key) or "") + value
        elif key in ("tool_calls", "choices") and isinstance(value, list):
            if not isinstance(into.get(key), dict):
                into[key] = {}
            for item in value:
                _merge(into[key].setdefault(str(item.get("index", 0)), {}), item)
        elif isinstance(value, list):
            if not isinstance(into.get(key), list):
                into[key] = []
            into[key].extend(value)
        elif isinstance(value, dict):
            if not isinstance(into.get(key), dict):
                into[key] = {}
            _merge(into[key], value)
        elif value is not None or key not in into:
            into[key] = value


def merged(events: list[Any]) -> dict[str, Any]:
    """A stream as what it says, not how it was cut: vLLM hands its serving layer every token
    produced since the layer last asked, so where one event ends depends on timing (two servers,
    or one server on a busier second, cut the same text in different places)."""
    out: dict[str, Any] = {}
    for event in events:
        if isinstance(event, dict):
            _merge(out, {k: v for k, v in event.items()
                         if (k != "usage" or v is not None) and k != "sequence_number"})
    return {**out, "done": events[-1] == "[DONE]"}


def same_stream(reference_url: str, base_url: str, path: str, body: dict[str, Any]
                ) -> list[Any]:
    """The same stream: the same text, tool calls, logprobs, finish reasons and usage, ending
    with [DONE] (Roundhouse batches events across Ray but passes the bytes through untouched;
    the cut between events is vLLM's and depends on timing, see `merged`); returns ours."""
    for attempt in range(1, ATTEMPTS + 1):
        ours, theirs = both(reference_url, base_url, path, {**body, "stream": True})
        assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)
        assert ours.headers["content-type"].startswith("text/event-stream")
        mine, vllm = sse(ours), sse(theirs)
        try:
            assert_close(normalized(merged(mine)), normalized(merged(vllm)))
        except AssertionError:
            if attempt == ATTEMPTS:
                raise
            continue
        return mine
    raise AssertionError("unreachable")


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "chat", "messages": ASK, "temperature": 0, "max_tokens": 24, **extra}


def test_chat_and_completions(reference_url: str, base_url: str) -> None:
    reply = same(reference_url, base_url, "/v1/chat/completions", chat())
    assert reply["choices"][0]["message"]["content"]
    same(reference_url, base_url, "/v1/chat/completions", chat(max_completion_tokens=5,
                                                               max_tokens=None))
    same(reference_url, base_url, "/v1/chat/completions",
         chat(temperature=0.9, seed=7, n=2, stop=["."]))
    same(reference_url, base_url, "/v1/completions",
         {"model": "chat", "prompt": "def fibonacci(n):", "max_tokens": 20, "temperature": 0})
    same(reference_url, base_url, "/v1/completions",
         {"model": "chat", "prompt": ["One, two,", "Red, green,"], "max_tokens": 6,
          "temperature": 0})


def test_streams(reference_url: str, base_url: str) -> None:
    events = same_stream(reference_url, base_url, "/v1/chat/completions",
                         chat(stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] > 0
    same_stream(reference_url, base_url, "/v1/completions",
                {"model": "chat", "prompt": "Once upon a time", "max_tokens": 16,
                 "temperature": 0})


def test_logprobs_echo_and_logit_bias(reference_url: str, base_url: str) -> None:
    reply = same(reference_url, base_url, "/v1/chat/completions",
                 chat(logprobs=True, top_logprobs=3, max_tokens=6))
    assert len(reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 3
    same(reference_url, base_url, "/v1/completions",
         {"model": "chat", "prompt": "The capital of France is", "max_tokens": 4,
          "temperature": 0, "logprobs": 2, "echo": True})
    # A strong bias on one token makes greedy decoding produce it: honoured, not ignored.
    token = httpx.post(f"{base_url}/tokenize", timeout=60, json={
        "model": "chat", "prompt": " banana", "add_special_tokens": False}).json()
    biased = same(reference_url, base_url, "/v1/chat/completions",
                  chat(max_tokens=3, logit_bias={str(token["tokens"][0]): 100}))
    assert "banana" in biased["choices"][0]["message"]["content"]
    same_stream(reference_url, base_url, "/v1/chat/completions",
                chat(logprobs=True, top_logprobs=2, max_tokens=4))


@pytest.mark.parametrize("tool_choice", ["none", "auto", "required",
                                         {"type": "function",
                                          "function": {"name": "get_weather"}}])
def test_tools(reference_url: str, base_url: str, tool_choice: Any) -> None:
    body = chat(tools=[WEATHER], tool_choice=tool_choice, max_tokens=160)
    reply = same(reference_url, base_url, "/v1/chat/completions", body)
    if tool_choice not in ("none", "auto"):
        (call,) = reply["choices"][0]["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        arguments = json.loads(call["function"]["arguments"])
        jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    same_stream(reference_url, base_url, "/v1/chat/completions", body)


def test_a_tool_result_turn(reference_url: str, base_url: str) -> None:
    """An agent's second turn: the assistant's tool call and the tool's result reach the chat
    template (not dropped), so both servers render the same prompt."""
    history = [*ASK,
               {"role": "assistant", "content": None, "tool_calls": [{
                   "id": "call_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}]
    reply = same(reference_url, base_url, "/v1/chat/completions",
                 chat(messages=history, tools=[WEATHER]))
    without = same(reference_url, base_url, "/v1/chat/completions", chat(messages=ASK))
    assert reply["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]


def structured(reply: dict[str, Any], schema: dict[str, Any] | None = None) -> None:
    """A structured-output reply is JSON (valid against `schema`) when the model finished it. A
    135M model sometimes writes a string value that runs to max_tokens; vLLM's own server then
    cuts it at the same place (`same` checked that), so a cut-off reply must only have started
    as an object."""
    choice = reply["choices"][0]
    content: str = choice["message"]["content"]
    assert content.startswith("{"), content
    if choice["finish_reason"] == "length":
        return
    assert choice["finish_reason"] == "stop", choice
    value = json.loads(content)
    assert isinstance(value, dict)
    if schema is not None:
        jsonschema.validate(value, schema)


def test_structured_outputs(reference_url: str, base_url: str) -> None:
    ask = [{"role": "user", "content": "Describe a person as JSON."}]
    reply = same(reference_url, base_url, "/v1/chat/completions", chat(
        messages=ask, max_tokens=300, response_format={
            "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}))
    structured(reply, PERSON)
    reply = same(reference_url, base_url, "/v1/chat/completions", chat(
        messages=ask, max_tokens=300, response_format={"type": "json_object"}))
    structured(reply)
    same(reference_url, base_url, "/v1/chat/completions", chat(
        messages=ask, max_tokens=10, structured_outputs={"choice": ["yes", "no"]}))


def test_content_parts_and_an_image_part(reference_url: str, base_url: str) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello."},
                                          {"type": "text", "text": "How are you?"}]}]
    same(reference_url, base_url, "/v1/chat/completions", chat(messages=parts))
    image = [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]
    refused = same(reference_url, base_url, "/v1/chat/completions", chat(messages=image))
    assert "multimodal" in refused["error"]["message"]


def test_responses_api(reference_url: str, base_url: str) -> None:
    body = {"model": "chat", "input": "Say hello to the team.", "max_output_tokens": 16,
            "temperature": 0, "store": False}
    reply = same(reference_url, base_url, "/v1/responses", body)
    assert reply["object"] == "response" and reply["output"]
    events = same_stream(reference_url, base_url, "/v1/responses", body)
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] == "response.completed"


def test_tokenize_and_detokenize(reference_url: str, base_url: str) -> None:
    tokens = same(reference_url, base_url, "/tokenize", {"model": "chat", "messages": ASK})
    same(reference_url, base_url, "/tokenize", {"model": "chat", "prompt": "hello world"})
    text = same(reference_url, base_url, "/detokenize",
                {"model": "chat", "tokens": tokens["tokens"]})
    assert "weather in Paris" in text["prompt"]


def test_errors(reference_url: str, base_url: str) -> None:
    for body in (chat(temperature=7), chat(n=0), chat(max_tokens="many"),
                 chat(messages=[{"role": "user", "content": "hi " * 2100}]),
                 chat(tool_choice="required"), chat(response_format={"type": "xml"})):
        ours = same(reference_url, base_url, "/v1/chat/completions", body)
        assert ours["error"]["type"] == "invalid_request_error"
    overflow = same(reference_url, base_url, "/v1/chat/completions",
                    chat(messages=[{"role": "user", "content": "hi " * 2100}]))
    assert overflow["error"]["code"] == "context_length_exceeded"
    assert overflow["error"]["message"].startswith("This model's maximum context length is")
