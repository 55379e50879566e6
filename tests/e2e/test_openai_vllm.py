"""End to end: configs/local.yaml on real vLLM engines, driven by the official openai client."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest

from tests.conftest import controller_status, model_handle, replicas, wait_until

pytestmark = pytest.mark.e2e


def test_chat_answers_sensibly(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="chat", temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    answer = resp.choices[0].message.content
    assert "Paris" in answer
    assert resp.usage.prompt_tokens > 10  # the chat template was applied
    assert resp.usage.completion_tokens <= 24
    # The prompt is counted once, by vLLM's renderer, as its tokenize endpoint counts it.
    base = f"{client.base_url}".removesuffix("/v1/")
    tokens = httpx.post(f"{base}/tokenize", timeout=60, json={
        "model": "chat",
        "messages": [{"role": "user", "content": "What is the capital of France?"}]}).json()
    assert tokens["count"] == resp.usage.prompt_tokens


def test_chat_streams_token_by_token(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="auto", temperature=0, max_tokens=16, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Count from one to five."}])
    chunks = list(stream)
    content = [c for c in chunks if c.choices]
    assert len(content) > 3
    assert content[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text.strip()
    assert content[-1].choices[0].finish_reason in ("stop", "length")
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    with_text = [c for c in content if c.choices[0].delta.content]
    assert len(with_text) <= usage.completion_tokens <= 16


def test_stream_and_non_stream_agree_at_temperature_zero(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name a color."}]
    full = client.chat.completions.create(model="chat", messages=messages, temperature=0,
                                          max_tokens=12)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model="chat", messages=messages, temperature=0,
                                                max_tokens=12, stream=True)
        if c.choices)
    assert streamed == full.choices[0].message.content


def test_on_demand_models_start_cold(base_url: str) -> None:
    assert replicas("chat") == 1
    assert replicas("code") == 0 and replicas("reasoning") == 0
    assert controller_status()["models"]["code"]["state"] == "cold"


def test_chat_and_an_on_demand_model_serve_completions(client: openai.OpenAI) -> None:
    for model in ("chat", "code"):
        resp = client.completions.create(model=model, prompt="def add(a, b):", max_tokens=8,
                                         temperature=0)
        assert resp.model == model
        assert resp.choices[0].text
        assert resp.usage.completion_tokens == 8


def test_auto_routes_code_to_the_code_model(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="auto", max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": "Fix this Python function:\n```python\n"
                   "def add(a, b):\n    return a - b\n```"}])
    assert raw.headers["x-roundhouse-route"] == "code"
    assert raw.headers["x-roundhouse-language"] == "python"
    resp = raw.parse()
    assert resp.model == "code" and resp.choices[0].message.content


def test_sampling_parameters_reach_the_engine(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="code", prompt="1, 2, 3, 4,", max_tokens=20,
                                     temperature=0.7, stop=[","], n=2, seed=1)
    assert [c.index for c in resp.choices] == [0, 1]
    for choice in resp.choices:
        assert "," not in choice.text and choice.finish_reason == "stop"
    again = client.completions.create(model="code", prompt="1, 2, 3, 4,", max_tokens=20,
                                      temperature=0.7, stop=[","], n=2, seed=1)
    assert [c.text for c in again.choices] == [c.text for c in resp.choices]  # seed honoured
    short = client.completions.create(model="code", prompt="Once upon a time", max_tokens=3,
                                      temperature=1.0, frequency_penalty=1.5,
                                      presence_penalty=-1, top_p=0.5)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    # Penalties reach the sampler: greedy output differs between rewarding and penalising
    # repeats (vLLM counts them over the generated tokens).
    for name in ("frequency_penalty", "presence_penalty"):
        texts = [client.completions.create(
            model="code", prompt="yes yes yes yes yes yes", max_tokens=16, temperature=0,
            **{name: value}).choices[0].text for value in (-2.0, 2.0)]
        assert texts[0] != texts[1], (name, texts)


def test_engine_parameter_errors_are_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="greedy"):
        client.completions.create(model="code", prompt="x", max_tokens=2, temperature=0, n=2)


def test_models_endpoint(client: openai.OpenAI) -> None:
    assert sorted(m.id for m in client.models.list()) == ["chat", "code", "reasoning"]


def test_errors_are_openai_errors(client: openai.OpenAI, base_url: str) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}],
                                       top_p=3)
    with pytest.raises(openai.BadRequestError) as too_long:  # a prompt over the 2048 context
        client.chat.completions.create(model="chat", max_tokens=10,
                                       messages=[{"role": "user", "content": "hi " * 2100}])
    assert "maximum context length is 2048" in str(too_long.value)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as capped:  # over the config's output cap
        client.chat.completions.create(model="chat", max_tokens=4000,
                                       messages=[{"role": "user", "content": "hi"}])
    assert capped.value.code == "max_tokens_exceeded" and "1024" in str(capped.value)
    resp = httpx.post(f"{base_url}/v1/chat/completions", content=b'{"model": "chat",', timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    huge = b'{"model":"chat","messages":[{"role":"user","content":"' + b"a" * (9 << 20) + b'"}]}'
    assert httpx.post(f"{base_url}/v1/chat/completions", content=huge,
                      timeout=60).status_code == 413


def test_asking_reasoning_evicts_code_while_chat_keeps_serving(client: openai.OpenAI) -> None:
    # The budget (6.5 GiB) holds the pinned chat (3) and one on-demand model (3).
    assert client.completions.create(model="code", prompt="x", max_tokens=2).choices
    assert replicas("code") == 1
    hello = [{"role": "user", "content": "Say hello."}]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # Routed by the rules: a proof goes to the reasoning model.
        swap = pool.submit(client.chat.completions.create, model="auto", max_tokens=8,
                           temperature=0, messages=[{"role": "user", "content":
                                                     "Prove that 17 is a prime number."}])
        wait_until(lambda: controller_status()["models"]["code"]["state"] != "active", 30,
                   "code to be chosen for eviction")
        served_during_swap = 0
        while not swap.done():  # chat keeps answering while code stops and reasoning loads
            resp = client.chat.completions.create(model="chat", max_tokens=4, messages=hello)
            assert resp.choices[0].message.content
            served_during_swap += 1
        answer = swap.result()
    assert answer.model == "reasoning" and answer.choices[0].message.content
    assert served_during_swap >= 3
    assert replicas("code") == 0  # seen through Serve's status API
    assert replicas("reasoning") == 1 and replicas("chat") == 1
    messages = [d["message"] for d in controller_status()["decisions"]]
    evict = next(i for i, m in enumerate(messages) if m.startswith("evict code:"))
    assert messages[evict].startswith("evict code: least recently used, reasoning needs 3.0 GiB")
    stop = next(i for i, m in enumerate(messages) if m.startswith("stopped code:"))
    load = next(i for i, m in enumerate(messages) if m.startswith("load reasoning:"))
    assert evict < stop < load
    assert controller_status()["held_gib"] <= 6.5


def test_disconnect_aborts_the_vllm_request(base_url: str) -> None:
    handle = model_handle("reasoning")
    body = {"model": "reasoning", "max_tokens": 1500, "stream": True, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Write a very long story."}]}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()  # keep a reference: dropping it closes the stream early
        first = next(lines)
        assert first.startswith("data: ") and '"error"' not in first, first
        wait_until(lambda: handle.stats.remote().result()["unfinished_requests"] == 1, 30,
                   "vLLM to hold the streaming request")
    wait_until(lambda: handle.stats.remote().result()["unfinished_requests"] == 0, 10,
               "vLLM to abort the request after the client disconnected")
    assert handle.stats.remote().result()["kv_reserved_tokens"] == 0


def test_burst_of_long_outputs_does_not_starve_short_requests(base_url: str) -> None:
    """The seed's failure mode: long outputs reserve most of chat's KV budget; the rest queue
    (or get 429 beyond the queue), and short requests are still served."""
    handle = model_handle("chat")
    budget = handle.stats.remote().result()["kv_budget_tokens"]
    # Each long one is "large" (over 1/16 of the budget) and large ones share half of it: two
    # run at once, the others wait, while short ones keep the other half.
    long_tokens = budget // 3

    def ask(max_tokens: int, ignore_eos: bool) -> tuple[int, float]:
        started = time.monotonic()
        resp = httpx.post(f"{base_url}/v1/chat/completions", timeout=300, json={
            "model": "chat", "max_tokens": max_tokens, "ignore_eos": ignore_eos,
            "temperature": 0, "messages": [{"role": "user", "content": "Tell me a story."}]})
        if resp.status_code not in (200, 429):
            pytest.fail(f"undeclared status {resp.status_code}: {resp.text}")
        return resp.status_code, time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        longs = [pool.submit(ask, min(long_tokens - 40, 600), True) for _ in range(6)]
        wait_until(lambda: handle.stats.remote().result()["queued_requests"] >= 1, 60,
                   "long requests to fill the budget and queue")
        shorts = [pool.submit(ask, 8, False) for _ in range(8)]
        short_results = [f.result() for f in shorts]
        long_results = [f.result() for f in longs]
    assert all(code == 200 for code, _ in short_results), short_results
    assert {code for code, _ in long_results} <= {200, 429}
    assert sum(code == 200 for code, _ in long_results) >= 3
    stats = handle.stats.remote().result()
    assert stats["kv_reserved_tokens"] == 0 and stats["queued_requests"] == 0


def test_server_still_serves_after_bad_input(client: openai.OpenAI, base_url: str) -> None:
    # Not JSON; messages of the wrong type; a prompt of the wrong type; a message without a
    # role and a non-numeric temperature. (A user message without content is valid to vLLM and
    # would generate, so it is not here.) max_tokens bounds the work should one be accepted.
    for content in (b"\x00\x01", b'{"messages": "hi", "max_tokens": 1}',
                    b'{"prompt": 7, "max_tokens": 1}',
                    b'{"messages": [{"content": "hi"}], "prompt": 7, "temperature": "hot",'
                    b' "max_tokens": 1}'):
        # Each is refused with a client error; the wait allows for a loaded CI machine.
        for path in ("/v1/chat/completions", "/v1/completions"):
            status = httpx.post(f"{base_url}{path}", content=content, timeout=60).status_code
            assert 400 <= status < 500, (path, content, status)
    resp = client.chat.completions.create(model="chat", max_tokens=4,
                                          messages=[{"role": "user", "content": "Hello!"}])
    assert resp.choices[0].message.content
