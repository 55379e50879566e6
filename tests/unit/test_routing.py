"""policy/routing.py and policy/signals.py: rules, decisions and the signals they read."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_app.cli import main
from serve_app.config import AppConfig, ConfigError, load_app_config, parse_app_config
from serve_app.errors import BadRequest, ModelNotFound
from serve_app.policy.routing import (
    Condition,
    RouteInput,
    Router,
    Rule,
    UnknownModel,
    detect,
)
from serve_app.router import build_router, decide_body
from tests.conftest import REPO

LOCAL = REPO / "configs" / "local.yaml"
NAMES = {"chat": "chat", "code": "code", "reasoning": "reasoning", "coder": "code"}


def user(*texts: str, system: str | None = None) -> RouteInput:
    """A chat input whose user/assistant turns alternate, starting with the user."""
    messages = [("system", system)] if system else []
    messages += [("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts)]
    return RouteInput("chat", messages=tuple(messages))


def router(*rules: Rule, fallbacks: dict[str, str] | None = None) -> Router:
    return Router(rules, "chat", NAMES, fallbacks)


# --- decisions -------------------------------------------------------------------------------


def test_explicit_name_or_alias_bypasses_rules() -> None:
    r = router(Rule("everything", "reasoning"))
    named = r.decide(RouteInput("chat", model="code", messages=(("user", "hi"),)))
    assert (named.model, named.rule) == ("code", "explicit")
    alias = r.decide(RouteInput("chat", model="coder", messages=(("user", "hi"),)))
    assert (alias.model, alias.rule) == ("code", "explicit")
    assert "alias 'coder'" in alias.reason
    with pytest.raises(UnknownModel, match="'gpt-4' does not exist; available: auto, chat"):
        r.decide(RouteInput("chat", model="gpt-4"))


def test_first_matching_rule_wins_then_default() -> None:
    r = router(Rule("completions", "code", Condition(endpoint="completions")),
               Rule("quality", "reasoning", Condition(quality="high")),
               Rule("also-quality", "code", Condition(quality="high")))
    assert r.decide(RouteInput("completions", messages=(("user", "x"),))).rule == "completions"
    high = r.decide(RouteInput("chat", quality="high", messages=(("user", "x"),)))
    assert (high.model, high.rule, high.reason) == ("reasoning", "quality", "quality high")
    plain = r.decide(RouteInput("chat", messages=(("user", "hello"),)))
    assert (plain.model, plain.rule) == ("chat", "default")
    assert plain.reason.startswith("no rule matched (code score 0")


def test_conditions_on_length_turns_keywords_and_languages() -> None:
    r = router(
        Rule("long", "reasoning", Condition(min_prompt_tokens=1000)),
        Rule("deep", "reasoning", Condition(min_turns=3, max_turns=5)),
        Rule("billing", "chat", Condition(keywords=("refund", "charged twice"))),
        Rule("support-bot", "chat", Condition(system_keywords=("support agent",))),
        Rule("rust", "code", Condition(languages=frozenset({"rust"}))),
        Rule("short-code", "code", Condition(code=True, max_prompt_tokens=20)),
    )
    assert r.decide(user("word " * 900)).rule == "long"
    assert r.decide(user("a", "b", "c", "d", "e")).rule == "deep"
    assert r.decide(user(*"abcdefghijk")).rule == "default"  # 6 user turns
    assert r.decide(user("I was Charged Twice this month")).rule == "billing"
    assert r.decide(user("I was charged for two things")).rule == "default"
    assert r.decide(user("hello", system="You are a support agent for CloudBox.")).rule == \
        "support-bot"
    rust = r.decide(user("error[E0382]: borrow of moved value: `v` in src/main.rs"))
    assert (rust.rule, rust.language) == ("rust", "rust")
    assert r.decide(user("Write a Python function that adds two numbers.")).rule == \
        "short-code"


def test_decision_headers_are_ascii_and_carry_no_request_text() -> None:
    secret = "zq9-SECRET-TOKEN"
    decision = router(Rule("code", "code", Condition(code=True))).decide(
        user(f"```python\nprint('{secret}')\n```\nwhy, naïve café?"))
    headers = decision.headers()
    assert headers["x-roundhouse-model"] == "code"
    assert headers["x-roundhouse-language"] == "python"
    for value in headers.values():
        value.encode("ascii")
        assert secret not in value
    assert secret not in json.dumps(decision.as_dict())
    fallback = decision.with_fallback("chat", "code failed to load")
    assert fallback.model == "chat" and fallback.fallback_from == "code"
    assert fallback.headers()["x-roundhouse-fallback-from"] == "code"
    assert router(fallbacks={"code": "chat"}).fallback("code") == "chat"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant", "tool"]),
                          st.text(max_size=400)), max_size=6),
       st.sampled_from(["chat", "completions"]),
       st.sampled_from([None, "high", "standard"]))
def test_any_request_gets_a_decision(messages: list[tuple[str, str]], endpoint: str,
                                     quality: str | None) -> None:
    r = build_router(load_app_config(LOCAL, check_engine=False))
    decision = r.decide(RouteInput(endpoint, quality=quality, messages=tuple(messages)))
    assert decision.model in ("chat", "code", "reasoning")
    for value in decision.headers().values():
        value.encode("latin-1")
    json.dumps(decision.as_dict())


# --- signals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "I saw a huge python at the zoo today, how long do they get?",
    "Planning a trip to the island of Java, which temples should we see?",
    "How do I get rust off my bike chain?",
    "Tell me about the history of the C programming language.",
    "Is Java coffee actually from Java?",
    "What does a ruby symbolize?",
    "Tell me about the Go board game.",
    "Research shows that people sleep better in cool rooms. Why?",
    "How can I prove my identity to the bank without a passport?",
    "Give me step-by-step instructions to reset my router.",
    "I have 2 kids aged 5 and 8, what movies can we watch?",
])
def test_traps_are_neither_code_nor_reasoning(text: str) -> None:
    signals = detect(user(text))
    assert not signals.code and not signals.reasoning, signals


@pytest.mark.parametrize(("text", "language"), [
    ("```ts\nconst x: number = 1;\n```", "typescript"),
    ("Fix this:\ndef add(a, b):\n    return a + b\nprint(add(1))", "python"),
    ("panic in main.go: goroutine 1 [running]:\nmain.main()", "go"),
    ("Exception in thread \"main\" java.lang.NullPointerException\n\tat Foo.bar(Foo.java:3)",
     "java"),
    ("SELECT name FROM users WHERE id = 3; is slow in Postgres", "sql"),
    ("Write a bash script that deletes old logs", "shell"),
    ("kubectl get pods shows CrashLoopBackOff for my deployment", "kubernetes"),
    ("用Python写一个读取JSON文件的函数", "python"),
    ("How do I center a div with CSS flexbox?", "css"),
])
def test_code_and_its_language(text: str, language: str) -> None:
    signals = detect(user(text))
    assert signals.code, signals
    assert signals.language == language


@pytest.mark.parametrize("text", [
    "Prove that the square root of 2 is irrational.",
    "A train leaves at 2 pm going 60 mph, another at 3 pm going 75 mph. When does it catch up?",
    "Knights always tell the truth and knaves always lie. A says B is a knave. Who is who?",
    "Think step by step: are all bloops lazzies if all bloops are razzies?",
    "Should we rent or buy? House $450k, 20% down, 6.5% rate, rent $2,300. Weigh the trade-offs.",
    "Schedule 6 exams over 3 days, at most 2 per day; Math and Physics can't share a day.",
    "Beweise, dass die Summe der Innenwinkel eines Dreiecks 180 Grad beträgt.",
    "How many ways can 8 people sit around a round table?",
])
def test_reasoning(text: str) -> None:
    signals = detect(user(text))
    assert signals.reasoning and not signals.code, signals


def test_pasted_code_beats_a_reasoning_question_about_it() -> None:
    signals = detect(user("Prove this terminates, step by step:\n```python\ndef f(n):\n"
                          "    while n > 1:\n        n //= 2\n```"))
    assert signals.code and not signals.reasoning


def test_context_keeps_a_follow_up_on_topic_but_a_system_prompt_alone_does_not() -> None:
    debugging = user("My script fails:\nTraceback (most recent call last):\n  File \"a.py\", "
                     "line 3, in <module>\nKeyError: 'cart'",
                     "Use request.session.get('cart', {}) instead.",
                     "Thanks, that worked! And how do I keep it after login?")
    assert detect(debugging).code
    assert "context" in " ".join(detect(debugging).code_evidence)
    small_talk = user("Good morning! How was your weekend?",
                      system="You are a senior Python engineer. Answer with code.")
    assert not detect(small_talk).code


def test_long_prompts_are_read_at_both_ends() -> None:
    filler = "The quarterly report covers revenue, costs and hiring across regions. " * 400
    tail = detect(user(filler + "\n```python\nimport os\nprint(os.getcwd())\n```"))
    assert tail.code and tail.prompt_tokens > 7000
    head = detect(user("Prove that there are infinitely many primes. Context follows.\n"
                       + filler))
    assert head.reasoning


# --- the labeled evaluation set --------------------------------------------------------------


def test_eval_set_accuracy_and_confusion_matrix() -> None:
    """tests/data/routing_eval.jsonl: realistic requests labeled with the local roles."""
    r = build_router(load_app_config(LOCAL, check_engine=False))
    rows = [json.loads(line) for line in (REPO / "tests/data/routing_eval.jsonl").open()]
    assert len(rows) >= 150
    labels = ("chat", "code", "reasoning")
    matrix = {(want, got): 0 for want in labels for got in labels}
    misses = []
    for row in rows:
        got = decide_body(r, row).model
        matrix[(row["label"], got)] += 1
        if got != row["label"]:
            misses.append(f"{row['label']} -> {got}: {json.dumps(row)[:120]}")
    correct = sum(matrix[(label, label)] for label in labels)
    accuracy = correct / len(rows)
    corner = "label \\ routed"
    table = "\n".join(
        [f"{corner:>16}" + "".join(f"{got:>11}" for got in labels)]
        + [f"{want:>16}" + "".join(f"{matrix[(want, got)]:>11}" for got in labels)
           for want in labels])
    print(f"\nrouting accuracy {accuracy:.3f} ({correct}/{len(rows)})\n{table}")
    assert accuracy >= 0.95, f"{accuracy:.3f}\n{table}\n" + "\n".join(misses)
    for label in labels:
        total = sum(matrix[(label, got)] for got in labels)
        assert matrix[(label, label)] / total >= 0.9, f"recall of {label}\n{table}"


# --- config and tools ------------------------------------------------------------------------


def _args(**routing: Any) -> dict[str, Any]:
    return {"models": [{"name": "chat", "engine": "fake"},
                       {"name": "code", "engine": "fake", "aliases": ["coder"]}],
            "routing": routing}


@pytest.mark.parametrize(("routing", "message"), [
    ({"rules": [{"name": "x", "model": "gpt", "when": {"code": True}}]}, "model 'gpt' is not"),
    ({"rules": [{"name": "default", "model": "code"}]}, "reserved or used twice"),
    ({"rules": [{"name": "a", "model": "code"}, {"name": "a", "model": "chat"}]}, "used twice"),
    ({"rules": [{"name": "a", "model": "code", "when": {"languages": ["cobol"]}}]},
     "unknown languages ['cobol']"),
    ({"rules": [{"name": "a", "model": "code", "when": {"colour": "red"}}]}, "colour"),
    ({"fallbacks": {"code": "gpt"}}, "'gpt' is not one of"),
    ({"fallbacks": {"coder": "code"}}, "cannot fall back to itself"),
])
def test_bad_routing_config_is_refused(routing: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(")):
        parse_app_config(_args(**routing), check_engine=False)


def test_rules_and_fallbacks_accept_aliases() -> None:
    config = AppConfig.model_validate(_args(
        rules=[{"name": "c", "model": "coder", "when": {"code": True}}],
        fallbacks={"coder": "chat"}))
    r = build_router(config)
    assert r.rules[0].model == "code" and r.fallback("code") == "chat"


def test_body_errors_are_openai_errors() -> None:
    r = build_router(load_app_config(LOCAL, check_engine=False))
    with pytest.raises(BadRequest, match="neither 'messages' nor 'prompt'"):
        decide_body(r, {"model": "auto"})
    with pytest.raises(BadRequest, match="X-Roundhouse-Quality must be one of high, standard"):
        decide_body(r, {"messages": [{"role": "user", "content": "x"}]}, quality_header="max")
    with pytest.raises(ModelNotFound):
        decide_body(r, {"model": "nope", "prompt": "x"})
    with pytest.raises(BadRequest, match="unknown endpoint"):
        decide_body(r, {"prompt": "x"}, endpoint="/v1/embeddings")


def test_route_cli_prints_one_decision_per_line(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    lines = [
        {"messages": [{"role": "user", "content": "Write a Go function to reverse a slice"}]},
        {"prompt": "def fib(n):\n    return"},
        {"model": "reasoning", "messages": [{"role": "user", "content": "hi"}]},
    ]
    stdin = "\n".join(json.dumps(x) for x in lines) + "\n\nnot json\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert main(["route", "--config", str(LOCAL)]) == 1  # the bad line fails the run
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(o["line"], o.get("model"), o.get("rule")) for o in out] == [
        (1, "code", "code"), (2, "code", "code"), (3, "reasoning", "explicit"),
        (5, None, None)]
    assert out[0]["language"] == "go" and out[0]["fallback"] == "chat"
    assert "error" in out[3]

    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(lines[1]) + "\n"))
    assert main(["route", "--config", str(LOCAL), "--endpoint", "/v1/completions",
                 "--quality", "high"]) == 0
    assert json.loads(capsys.readouterr().out)["rule"] == "quality-high"


@pytest.mark.parametrize("config", ["configs/local.yaml", "serve_config.yaml",
                                    "configs/h100-pinned-chat.yaml"])
def test_shipped_configs_route_the_three_roles(config: str) -> None:
    r = build_router(load_app_config(REPO / config, check_engine=False))
    assert decide_body(r, {"messages": [{"role": "user", "content": "Hi! How are you?"}]}
                       ).model == "chat"
    assert decide_body(r, {"prompt": "def fib(n):\n    if n < 2:\n        return n"}
                       ).model == "code"
    assert decide_body(r, {"messages": [{"role": "user", "content": "Prove that the square "
                                         "root of 2 is irrational."}]}).model == "reasoning"
    assert r.fallback("code") == "chat" and r.fallback("reasoning") == "chat"
