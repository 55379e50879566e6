"""Real client libraries against Roundhouse on vLLM (configs/local.yaml): LangChain's ChatOpenAI
(structured outputs, tools, an agent's tool-result turn), LiteLLM (completion, streaming, tools,
context overflow as ContextWindowExceededError), the openai SDK's Responses API and an OpenAI
Agents SDK agent calling a tool. The model is a 135M one: the tests check what the protocol
guarantees (valid structures, parsed tool calls, error types), not the quality of answers."""

from __future__ import annotations

import os
from typing import Any

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.e2e

# LiteLLM fetches its model price list from the internet unless told to use its own copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

PERSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
                                                  "age": {"type": "integer"}},
                 "required": ["name", "age"]}
WEATHER_ARGS = {"type": "object", "properties": {"city": {"type": "string"}},
                "required": ["city"]}


def get_weather(city: str) -> str:
    """Current weather in a city."""
    return f"sunny in {city}"


@pytest.fixture(scope="module")
def chat_model(base_url: str) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=f"{base_url}/v1", api_key="unused", model="chat", temperature=0,
                      max_tokens=160, max_retries=0, timeout=120)


def test_langchain_invoke_and_stream(chat_model: Any) -> None:
    assert chat_model.invoke("Say hello.").content
    chunks = list(chat_model.stream("Count to three."))
    assert "".join(c.content for c in chunks)


def test_langchain_structured_output(chat_model: Any) -> None:
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    prompt = "Describe a person: name and age."
    for method in ("json_schema", "function_calling"):
        person = chat_model.with_structured_output(Person, method=method).invoke(prompt)
        assert isinstance(person, Person), method
    as_dict = chat_model.with_structured_output(PERSON_SCHEMA | {"title": "person"},
                                                method="json_schema").invoke(prompt)
    jsonschema.validate(as_dict, PERSON_SCHEMA)
    json_mode = chat_model.with_structured_output(method="json_mode").invoke(
        "Return a JSON object describing a person.")
    assert isinstance(json_mode, dict)


def test_langchain_tools_and_the_tool_result_turn(chat_model: Any) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    weather = tool(get_weather)
    forced = chat_model.bind_tools([weather], tool_choice="get_weather")
    question = HumanMessage("What is the weather in Paris?")
    call_message = forced.invoke([question])
    (call,) = call_message.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER_ARGS)
    # The agent's second turn: the tool call and its result go back with the tools bound.
    result = ToolMessage(weather.invoke(call["args"]), tool_call_id=call["id"])
    answer = chat_model.bind_tools([weather]).invoke([question, call_message, result])
    assert answer.content or answer.tool_calls


def test_litellm_completion_stream_tools_and_context_overflow(base_url: str) -> None:
    import litellm

    common: dict[str, Any] = {"model": "openai/chat", "api_base": f"{base_url}/v1",
                              "api_key": "unused", "max_retries": 0, "timeout": 120}
    hello = [{"role": "user", "content": "Say hello."}]
    reply = litellm.completion(messages=hello, max_tokens=8, temperature=0, **common)
    assert reply.choices[0].message.content and reply.usage.completion_tokens <= 8
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in litellm.completion(
        messages=hello, max_tokens=8, temperature=0, stream=True, **common))
    assert streamed == reply.choices[0].message.content
    tools = [{"type": "function", "function": {"name": "get_weather",
                                               "parameters": WEATHER_ARGS}}]
    called = litellm.completion(
        messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=160, temperature=0, **common)
    (call,) = called.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(messages=[{"role": "user", "content": "hi " * 2100}],
                           max_tokens=8, **common)


def test_openai_responses_api(client: openai.OpenAI) -> None:
    response = client.responses.create(model="chat", input="Say hello to the team.",
                                       max_output_tokens=16, temperature=0, store=False)
    assert response.object == "response" and response.output_text
    events = list(client.responses.create(model="chat", input="Say hello.",
                                          max_output_tokens=8, store=False, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta")


def test_an_openai_agents_sdk_agent_calls_a_tool(base_url: str) -> None:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)  # no export to OpenAI's servers
    calls: list[str] = []

    @function_tool
    def weather(city: str) -> str:
        """Current weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    model = OpenAIChatCompletionsModel(
        model="chat", openai_client=openai.AsyncOpenAI(base_url=f"{base_url}/v1",
                                                       api_key="unused", max_retries=0))
    agent = Agent(name="forecaster", instructions="Answer weather questions with the tool.",
                  tools=[weather], model=model, tool_use_behavior="stop_on_first_tool",
                  model_settings=ModelSettings(tool_choice="required", max_tokens=160,
                                               temperature=0))
    result = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=3)
    assert len(calls) == 1 and isinstance(calls[0], str)
    assert result.final_output == f"sunny in {calls[0]}"
