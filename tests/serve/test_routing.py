"""Routing through the real ingress: decisions in headers, the dry run, quality flags and
fallbacks, on Ray Serve with the fake engine."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import controller_status, replicas

pytestmark = pytest.mark.serve

RULES = [
    {"name": "quality-high", "when": {"quality": "high"}, "model": "reasoning"},
    {"name": "sql", "when": {"languages": ["sql"]}, "model": "code"},
    {"name": "code", "when": {"code": True}, "model": "code"},
    {"name": "quality-standard", "when": {"quality": "standard"}, "model": "chat"},
    {"name": "reasoning", "when": {"reasoning": True}, "model": "reasoning"},
    {"name": "escalation", "when": {"keywords": ["speak to a human"]}, "model": "broken"},
]

ARGS: dict[str, Any] = {
    "default_model": "chat",
    "routing": {"rules": RULES, "fallbacks": {"reasoning": "chat"}},
    "models": [
        {"name": "chat", "model": "fake", "pinned": True},
        {"name": "code", "model": "fake", "aliases": ["coder"]},
        # Fails to load: its requests fall back to chat.
        {"name": "reasoning", "model": "fake", "engine_kwargs": {"fail_load": "weights are corrupt"}},
        # Fails to load and has no fallback.
        {"name": "broken", "model": "fake", "engine_kwargs": {"fail_load": "no such checkpoint"}},
    ],
}

CODE_QUESTION = "Why does this fail?\n```python\ndef f(x):\n    return x +\n```"


@pytest.fixture(scope="module")
def base_url(deploy: Any) -> str:
    return deploy(ARGS)


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": content}],
            "max_tokens": 3, **extra}


def test_dry_run_decides_without_loading(base_url: str) -> None:
    # Runs first in this module: the code model has not been asked for yet.
    resp = httpx.post(f"{base_url}/v1/route", json=chat(CODE_QUESTION), timeout=30)
    assert resp.status_code == 200, resp.text
    decision = resp.json()
    assert (decision["model"], decision["rule"], decision["language"]) == ("code", "code",
                                                                          "python")
    assert "fenced block" in decision["reason"]
    assert decision["signals"]["code"] is True
    assert resp.headers["x-roundhouse-route"] == "code"
    assert replicas("code") == 0
    assert not any(d["message"].startswith("load code:")
                   for d in controller_status()["decisions"])

    completions = httpx.post(f"{base_url}/v1/route?endpoint=/v1/completions",
                             json={"prompt": "SELECT id, name FROM users WHERE"}, timeout=30)
    assert completions.status_code == 200, completions.text
    assert (completions.json()["rule"], completions.json()["language"]) == ("sql", "sql")

    bad = httpx.post(f"{base_url}/v1/route", json={"model": "auto"}, timeout=30)
    assert bad.status_code == 400 and "messages" in bad.json()["error"]["message"]


def test_decision_is_on_the_response(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": CODE_QUESTION}], max_tokens=3)
    assert raw.headers["x-roundhouse-model"] == "code"
    assert raw.headers["x-roundhouse-route"] == "code"
    assert raw.headers["x-roundhouse-language"] == "python"
    assert "fenced block" in raw.headers["x-roundhouse-route-reason"]
    assert raw.parse().model == "code"

    small_talk = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Good morning! How are you?"}],
        max_tokens=3)
    assert small_talk.headers["x-roundhouse-model"] == "chat"
    assert small_talk.headers["x-roundhouse-route"] == "default"


def test_streaming_response_carries_the_decision(base_url: str) -> None:
    with httpx.stream("POST", f"{base_url}/v1/chat/completions",
                      json=chat(CODE_QUESTION, stream=True), timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["x-roundhouse-route"] == "code"
        assert "".join(resp.iter_text()).endswith("data: [DONE]\n\n")


def test_explicit_model_and_alias_bypass_the_rules(client: openai.OpenAI) -> None:
    for name in ("chat", "coder"):
        raw = client.chat.completions.with_raw_response.create(
            model=name, messages=[{"role": "user", "content": CODE_QUESTION}], max_tokens=2)
        assert raw.headers["x-roundhouse-route"] == "explicit"
        assert raw.headers["x-roundhouse-model"] == ("chat" if name == "chat" else "code")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_quality_flag_from_header_or_metadata(client: openai.OpenAI, base_url: str) -> None:
    standard = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Prove that sqrt(2) is irrational."}],
        max_tokens=2, extra_headers={"X-Roundhouse-Quality": "standard"})
    assert standard.headers["x-roundhouse-route"] == "quality-standard"
    assert standard.headers["x-roundhouse-model"] == "chat"

    for extra in ({"extra_headers": {"X-Roundhouse-Quality": "HIGH"}},
                  {"metadata": {"quality": "high"}}):
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "Name a bakery."}],
            max_tokens=2, **extra)
        assert raw.headers["x-roundhouse-route"] == "quality-high"

    bad = httpx.post(f"{base_url}/v1/chat/completions", json=chat("hi"),
                     headers={"X-Roundhouse-Quality": "ultra"}, timeout=30)
    assert bad.status_code == 400
    assert "high, standard" in bad.json()["error"]["message"]
    bad_meta = httpx.post(f"{base_url}/v1/chat/completions",
                          json=chat("hi", metadata={"quality": 3}), timeout=30)
    assert bad_meta.status_code == 400 and bad_meta.json()["error"]["param"] == "metadata.quality"


def test_failed_model_falls_back_and_says_so(client: openai.OpenAI) -> None:
    # Routed to reasoning by the rules; reasoning cannot load, so chat answers.
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Prove that there are infinitely "
                                 "many primes."}], max_tokens=3)
    assert raw.status_code == 200
    assert raw.headers["x-roundhouse-model"] == "chat"
    assert raw.headers["x-roundhouse-fallback-from"] == "reasoning"
    assert raw.headers["x-roundhouse-route"] == "reasoning"
    assert "fallback from reasoning" in raw.headers["x-roundhouse-route-reason"]
    assert raw.parse().model == "chat"

    # Asked for by name, the same fallback applies (the body's `model` says who answered).
    named = client.chat.completions.with_raw_response.create(
        model="reasoning", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert named.headers["x-roundhouse-fallback-from"] == "reasoning"
    assert named.parse().model == "chat"


def test_failed_model_without_fallback_is_503_with_the_decision(base_url: str) -> None:
    resp = httpx.post(f"{base_url}/v1/chat/completions",
                      json=chat("I want to speak to a human please"), timeout=60)
    assert resp.status_code == 503
    assert "no such checkpoint" in resp.json()["error"]["message"]
    assert resp.headers["x-roundhouse-route"] == "escalation"
    assert resp.headers["x-roundhouse-model"] == "broken"
    assert "x-roundhouse-fallback-from" not in resp.headers
    assert "retry-after" in resp.headers
