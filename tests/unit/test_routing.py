"""policy/routing.py and policy/signals.py: rules, decisions and the signals they read; the
hybrid (signals, then the classifier) and its accuracy on labeled sets."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_app.cli import main
from serve_app.config import AppConfig, ConfigError, load_app_config, parse_app_config
from serve_app.errors import BadRequest, ModelNotFound
from serve_app.policy.classifier import load_model
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
LABELS = ("chat", "code", "reasoning")
# The shipped configs' order: code, then reasoning, else the default (chat).
ROLE_RULES = (Rule("code", "code", Condition(code=True)),
              Rule("reasoning", "reasoning", Condition(reasoning=True)))


def user(*texts: str, system: str | None = None) -> RouteInput:
    """A chat input whose user/assistant turns alternate, starting with the user."""
    messages = [("system", system)] if system else []
    messages += [("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts)]
    return RouteInput("chat", messages=tuple(messages))


def router(*rules: Rule, fallbacks: dict[str, str] | None = None) -> Router:
    """Rules over the hand-written signals alone (the classifier off)."""
    return Router(rules, "chat", NAMES, fallbacks)


def hybrid(*rules: Rule, min_confidence: float = 0.0) -> Router:
    """Rules over the hybrid's verdict, with the shipped classifier."""
    return Router(rules or ROLE_RULES, "chat", NAMES, classifier=load_model(),
                  min_confidence=min_confidence)


def _header_safe(value: str) -> bool:
    return all(32 <= ord(c) < 127 for c in value)


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
        assert _header_safe(value)
        assert secret not in value
    assert secret not in json.dumps(decision.as_dict())
    fallback = decision.with_fallback("chat", "code failed to load")
    assert fallback.model == "chat" and fallback.fallback_from == "code"
    assert fallback.headers()["x-roundhouse-fallback-from"] == "code"
    assert router(fallbacks={"code": "chat"}).fallback("code") == "chat"


_ANY_TEXT = st.text(alphabet=st.characters(codec=None, blacklist_categories=()), max_size=400)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
                          _ANY_TEXT), max_size=6),
       st.sampled_from(["chat", "completions"]),
       st.sampled_from([None, "high", "standard"]),
       st.booleans())
def test_any_request_gets_a_decision(messages: list[tuple[str, str]], endpoint: str,
                                     quality: str | None, with_classifier: bool) -> None:
    """Random unicode (lone surrogates and control characters included), random message
    lists: a decision, with printable ASCII headers."""
    config = load_app_config(LOCAL, check_engine=False)
    r = build_router(config)
    if not with_classifier:
        r = Router(r.rules, r.default_model, r.names, r.fallbacks)
    decision = r.decide(RouteInput(endpoint, quality=quality, messages=tuple(messages)))
    assert decision.model in ("chat", "code", "reasoning")
    for value in decision.headers().values():
        assert _header_safe(value), value
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


def _route_labeled(path: Path, threshold: float, recall: float) -> None:
    """Routes a labeled set through configs/local.yaml (the hybrid), prints the accuracy, the
    confusion matrix and what decided, and checks the accuracy and every label's recall."""
    r = build_router(load_app_config(LOCAL, check_engine=False))
    rows = [json.loads(line) for line in path.open() if line.strip()]
    matrix = {(want, got): 0 for want in LABELS for got in LABELS}
    deciders: dict[str, int] = {}
    misses = []
    for row in rows:
        decision = decide_body(r, row)
        got = decision.model
        by = decision.signals.decided_by if decision.signals else decision.rule
        deciders[by] = deciders.get(by, 0) + 1
        matrix[(row["label"], got)] += 1
        if got != row["label"]:
            misses.append(f"{row['label']} -> {got} ({decision.reason[:100]})")
    correct = sum(matrix[(label, label)] for label in LABELS)
    accuracy = correct / len(rows)
    corner = "label \\ routed"
    table = "\n".join(
        [f"{corner:>16}" + "".join(f"{got:>11}" for got in LABELS) + f"{'recall':>9}"]
        + [f"{want:>16}" + "".join(f"{matrix[(want, got)]:>11}" for got in LABELS)
           + f"{matrix[(want, want)] / max(1, sum(matrix[(want, g)] for g in LABELS)):>9.3f}"
           for want in LABELS])
    print(f"\n{path.name}: routing accuracy {accuracy:.3f} ({correct}/{len(rows)}); decided "
          f"by {deciders}\n{table}")
    assert accuracy >= threshold, f"{accuracy:.3f}\n{table}\n" + "\n".join(misses)
    for label in LABELS:
        total = sum(matrix[(label, got)] for got in LABELS)
        assert matrix[(label, label)] / total >= recall, f"recall of {label}\n{table}\n" + \
            "\n".join(misses)


def test_eval_set_accuracy_and_confusion_matrix() -> None:
    """tests/data/routing_eval.jsonl, the regression set: the 410 requests the hand-written
    rules were tuned on (the classifier was not trained on them)."""
    _route_labeled(REPO / "tests/data/routing_eval.jsonl", 0.97, 0.92)


def test_heldout_set_accuracy_and_confusion_matrix() -> None:
    """tests/data/routing_heldout.jsonl: requests written apart from the training data, never
    used to train or tune anything (docs/routing.md). Asserted: issue 16's acceptance bar for
    requests written by others (accuracy >= 0.93, every recall >= 0.9). The goal was 0.95 and
    0.92; the one run after everything was frozen measured 0.949 (728/767), recalls chat 0.945,
    code 0.925, reasoning 0.985: the goal's accuracy was missed by one request."""
    path = REPO / "tests/data/routing_heldout.jsonl"
    assert path.exists(), "the held-out set is missing"
    _route_labeled(path, 0.93, 0.90)


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
    "What's a 20% tip on a $45 dinner?",
    "Write a short poem about a programmer who can't sleep.",
])
def test_traps_stay_on_chat(text: str) -> None:
    decision = hybrid().decide(user(text))
    assert decision.model == "chat", decision.reason


def test_signals_decide_when_sure_and_the_classifier_otherwise() -> None:
    r = hybrid()
    fenced = r.decide(user("why?\n```python\nprint(1/0)\n```"))
    assert (fenced.model, fenced.signals.decided_by) == ("code", "signal")  # type: ignore[union-attr]
    assert fenced.reason == "code (python) by signal: fenced block"
    prose = r.decide(user("my container exits with code 137 a few seconds after it starts"))
    assert prose.model == "code" and prose.signals is not None
    assert prose.signals.decided_by == "classifier" and 0.5 < prose.signals.confidence <= 1
    assert prose.reason.startswith("code by classifier, confidence 0.") or \
        prose.reason.startswith("code (")
    assert prose.signals.features and all(" +" in f for f in prose.signals.features)
    puzzle = r.decide(user("Three people need to cross a bridge at night with one torch; the "
                           "bridge holds two. They take 1, 2 and 5 minutes. What is the "
                           "fastest they can all get across?"))
    assert puzzle.model == "reasoning"


def test_min_confidence_sends_unsure_verdicts_to_the_default() -> None:
    text = user("my container exits with code 137 a few seconds after it starts")
    assert hybrid(min_confidence=0.0).decide(text).model == "code"
    unsure = hybrid(min_confidence=1.0).decide(text)
    assert (unsure.model, unsure.rule) == ("chat", "default")
    assert "below min_confidence" in unsure.reason
    # A sure signal is not the classifier's: min_confidence does not apply to it.
    fenced = hybrid(min_confidence=1.0).decide(user("```go\nfunc main() {}\n```"))
    assert fenced.model == "code"


def test_classifier_off_is_the_rules_alone() -> None:
    config = load_app_config(LOCAL, check_engine=False)
    off = config.model_copy(update={"routing": config.routing.model_copy(update={
        "classifier": config.routing.classifier.model_copy(update={"enabled": False})})})
    r = build_router(off)
    assert r.classifier is None
    inp = user("my container exits with code 137 a few seconds after it starts")
    assert r.decide(inp).signals == detect(inp)
    assert detect(inp).decided_by == "rules"


def test_the_last_turn_decides_and_context_helps() -> None:
    r = hybrid()
    session = ("my flask app crashes on startup with ModuleNotFoundError: No module named "
               "'flask_cors'",
               "Install it in the same virtualenv: `pip install flask-cors`, then restart.")
    assert r.decide(user(*session, "thanks, that worked!")).model == "chat"
    assert r.decide(user(*session, "ok and how do I make it start automatically when the "
                                   "server boots?")).model == "code"
    small_talk = user("Good morning! How was your weekend?",
                      system="You are a senior Python engineer. Answer with code.")
    assert r.decide(small_talk).model == "chat"


def test_rules_on_code_and_languages_see_the_classifier_verdict() -> None:
    r = hybrid(Rule("python", "code", Condition(languages=frozenset({"python"}))),
               Rule("reasoning", "reasoning", Condition(reasoning=True)))
    decision = r.decide(user("in python, why is my list comprehension so slow on 10 million "
                             "items compared to numpy"))
    assert (decision.rule, decision.language) == ("python", "python")
    assert "by classifier" in decision.reason


def test_a_missing_or_invalid_model_file_fails_the_config(tmp_path: Path) -> None:
    bad = tmp_path / "model.json.gz"
    bad.write_text("{}")
    for path, message in ((tmp_path / "missing.json.gz", "cannot read the model file"),
                          (bad, "not a Roundhouse router model")):
        config = AppConfig.model_validate(_args(classifier={"path": str(path)}))
        with pytest.raises(ConfigError, match=f"routing.classifier.path: .*{message}"):
            build_router(config)


def test_route_train_and_eval_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    data = REPO / "tests/data/routing_eval.jsonl"
    model = tmp_path / "model.json.gz"
    assert main(["route", "train", "--data", str(data), "--out", str(model), "--no-cv"]) == 0
    assert "training accuracy" in capsys.readouterr().out
    config = tmp_path / "serve.yaml"
    document = yaml.safe_load(LOCAL.read_text())
    document["applications"][0]["args"]["routing"]["classifier"] = {"path": str(model)}
    config.write_text(yaml.safe_dump(document))
    assert load_app_config(config, check_engine=False).routing.classifier.path == str(model)
    assert main(["route", "--config", str(config), "eval", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert float(out.split()[1]) >= 0.95 and "recall" in out
    assert main(["route", "train", "--data", str(tmp_path / "nope.jsonl"), "--out",
                 str(model)]) == 1
    assert main(["route"]) == 1
    assert "--config is required" in capsys.readouterr().err


# --- config and tools ------------------------------------------------------------------------


def _args(**routing: Any) -> dict[str, Any]:
    return {"models": [{"name": "chat", "model": "fake"},
                       {"name": "code", "model": "fake", "aliases": ["coder"]}],
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
    with pytest.raises(BadRequest, match="the body has neither 'messages'"):
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
