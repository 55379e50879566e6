"""Which model serves a request: ordered rules over cheap signals of the request. Pure.

No model call and no network: the seed's point is that asking an LLM which LLM to ask defeats
the purpose. A decision costs tens of microseconds (benchmarks/routing_speed.py).

The hybrid (`routing.classifier.enabled`, the default): the high-precision signal decides when
it is sure (code that is in the last user message: a fence, a trace, a diff, SQL, code lines);
otherwise a small learned classifier (policy/classifier.py) decides chat, code or reasoning with
a calibrated confidence, reading the last user message, the context at a lower weight, and the
hand-written scores below as features of its own (it learned how far to trust each). Below
`routing.classifier.min_confidence` it claims neither code nor reasoning, so the default model
serves. Rule conditions `code` / `reasoning` test that verdict. With the classifier off, the
hand-written scores decide alone (the behaviour before the hybrid).

Signals (`Signals`, computed once per request by policy/signals.py):
- code: fenced blocks, stack traces, diffs, lines that parse as code, file names, programming
  vocabulary and "write/fix/refactor a function" asks; the language is named when it can be told
  (fence tag first, then the syntax and vocabulary of each language);
- reasoning: proofs and derivations, "step by step", multi-step quantitative problems, logic
  puzzles, planning under constraints, trade-off analyses;
- conversation length: user turns and an estimate of prompt tokens;
- the endpoint, an explicit quality flag and keywords of the system prompt.

The last user message decides most; earlier turns and the system prompt add a bounded share,
so a follow-up in a debugging session stays on the code model while a system prompt alone does
not move small talk. Language names alone are not code ("a python at the zoo", "the island of
Java"): they count only beside other evidence. Where code and reasoning both score, structural
code evidence (a fence, a trace, a diff, code lines) wins; otherwise the higher score does.

Text is scanned in bounded windows (head and tail of long messages), so an 8k-token prompt costs
about what a 1k-token one does.

Rules (from the config) are tried in order, the first whose conditions all hold wins, and the
default model takes the rest. An explicit model name (or alias) in the request bypasses them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from serve_app.policy.classifier import Classifier
from serve_app.policy.signals import (
    THRESHOLD,
    Lexicon,
    Score,
    Text,
    language,
    rule_features,
    rule_scores,
    score_code,
    score_reasoning,
)

QUALITY_LEVELS = ("high", "standard")
AUTO = "auto"

# Scan budget per part of the request, in characters (head + tail of longer texts).
_LAST_WINDOW = 1600
_CONTEXT_WINDOW = 400
_CONTEXT_MESSAGES = 3
# Earlier turns and the system prompt count at this weight, up to this much.
_CONTEXT_WEIGHT = 0.5
_CONTEXT_CAP = 3.0


class UnknownModel(ValueError):
    """The request names a model (or alias) that the config does not serve."""

    def __init__(self, requested: str, available: Sequence[str]) -> None:
        super().__init__(f"the model {requested!r} does not exist; available: "
                         f"{', '.join([AUTO, *available])}")
        self.requested = requested


# --- inputs and outputs --------------------------------------------------------------------


@dataclass(frozen=True)
class RouteInput:
    """What routing looks at; built from a validated request by the caller."""

    endpoint: str  # "chat" | "completions"
    model: str = AUTO
    quality: str | None = None  # "high" | "standard" | None
    # (role, text) in order; a completions prompt is one ("user", prompt) message.
    messages: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Signals:
    code: bool
    reasoning: bool
    language: str | None
    code_score: float
    reasoning_score: float
    turns: int
    prompt_tokens: int  # estimate: characters / 4
    code_evidence: tuple[str, ...] = ()
    reasoning_evidence: tuple[str, ...] = ()
    # Which part decided: "signal" (a high-precision signal was sure), "classifier", or
    # "rules" (the classifier is off: the hand-written scores decided).
    decided_by: str = "rules"
    # The classifier's label and calibrated confidence (when it decided), and the model
    # features that pushed most toward its label ("name +weight"; never other request text).
    classifier_label: str | None = None
    confidence: float | None = None
    features: tuple[str, ...] = ()

    def verdict(self) -> str:
        """What the request is and which part said so, for reasons and logs."""
        kind = "code" if self.code else "reasoning" if self.reasoning else "chat"
        if self.code and self.language:
            kind += f" ({self.language})"
        if self.decided_by == "signal":
            return f"{kind} by signal: {', '.join(self.code_evidence or self.reasoning_evidence)}"
        if self.decided_by == "classifier":
            said = self.classifier_label or kind
            why = f": {', '.join(self.features)}" if self.features else ""
            head = f"{kind} by classifier" if said == kind.split(" ")[0] else \
                f"{kind}: classifier said {said} below min_confidence"
            return f"{head}, confidence {self.confidence:.3f}{why}"
        return ""


@dataclass(frozen=True)
class RouteDecision:
    model: str
    rule: str
    reason: str
    language: str | None = None
    signals: Signals | None = None
    # Set when the routed model was unavailable and its configured fallback serves instead.
    fallback_from: str | None = None

    def with_fallback(self, model: str, why: str) -> RouteDecision:
        return replace(self, model=model, fallback_from=self.model,
                       reason=f"{self.reason}; fallback from {self.model}: {why}")

    def headers(self) -> dict[str, str]:
        """Response headers; ASCII only, and nothing from the request text itself."""
        out = {"x-roundhouse-model": self.model, "x-roundhouse-route": self.rule,
               "x-roundhouse-route-reason": _ascii(self.reason)}
        if self.language:
            out["x-roundhouse-language"] = self.language
        if self.fallback_from:
            out["x-roundhouse-fallback-from"] = self.fallback_from
        return out

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "rule": self.rule, "reason": self.reason,
                               "language": self.language, "fallback_from": self.fallback_from}
        if self.signals is not None:
            signals = asdict(self.signals)
            signals["code_evidence"] = list(self.signals.code_evidence)
            signals["reasoning_evidence"] = list(self.signals.reasoning_evidence)
            out["signals"] = signals
        return out


_CONTROL = {c: "?" for c in [*range(32), 127]}


def _ascii(text: str) -> str:
    """ASCII for a header: other characters as \\u escapes, control characters as '?'."""
    return text.translate(_CONTROL).encode("ascii", "backslashreplace").decode("ascii")


# --- rules ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """All set fields must hold. Empty: always holds."""

    endpoint: str | None = None
    quality: str | None = None
    code: bool | None = None
    languages: frozenset[str] | None = None  # implies code
    reasoning: bool | None = None
    min_turns: int | None = None
    max_turns: int | None = None
    min_prompt_tokens: int | None = None
    max_prompt_tokens: int | None = None
    # Any of these words or phrases (case-insensitive, whole words) in the last user message /
    # in the system prompt.
    keywords: tuple[str, ...] = ()
    system_keywords: tuple[str, ...] = ()

    def holds(self, inp: RouteInput, signals: Signals) -> bool:
        if self.endpoint is not None and inp.endpoint != self.endpoint:
            return False
        if self.quality is not None and inp.quality != self.quality:
            return False
        if self.code is not None and signals.code != self.code:
            return False
        if self.languages is not None and (not signals.code
                                           or signals.language not in self.languages):
            return False
        if self.reasoning is not None and signals.reasoning != self.reasoning:
            return False
        if self.min_turns is not None and signals.turns < self.min_turns:
            return False
        if self.max_turns is not None and signals.turns > self.max_turns:
            return False
        if self.min_prompt_tokens is not None and signals.prompt_tokens < self.min_prompt_tokens:
            return False
        if self.max_prompt_tokens is not None and signals.prompt_tokens > self.max_prompt_tokens:
            return False
        if self.keywords and not _keywords(self.keywords).any(Text(_last_user(inp))):
            return False
        if self.system_keywords and not _keywords(self.system_keywords).any(Text(_system(inp))):
            return False
        return True

    def describe(self, signals: Signals) -> str:
        parts: list[str] = []
        if self.endpoint is not None:
            parts.append(f"endpoint {self.endpoint}")
        if self.quality is not None:
            parts.append(f"quality {self.quality}")
        if signals.decided_by != "rules" and (
                self.code is not None or self.languages is not None or self.reasoning is not None):
            parts.append(signals.verdict())
        elif self.code is not None or self.languages is not None:
            if signals.code:
                lang = f" ({signals.language})" if signals.language else ""
                parts.append(f"code{lang} score {signals.code_score:g}: "
                             f"{', '.join(signals.code_evidence)}")
            else:
                parts.append(f"no code (score {signals.code_score:g})")
        if self.reasoning is not None and signals.decided_by == "rules":
            if signals.reasoning:
                parts.append(f"reasoning score {signals.reasoning_score:g}: "
                             f"{', '.join(signals.reasoning_evidence)}")
            else:
                parts.append(f"no reasoning (score {signals.reasoning_score:g})")
        if self.min_turns is not None or self.max_turns is not None:
            parts.append(f"{signals.turns} user turns")
        if self.min_prompt_tokens is not None or self.max_prompt_tokens is not None:
            parts.append(f"~{signals.prompt_tokens} prompt tokens")
        if self.keywords:
            parts.append("keyword in the message")
        if self.system_keywords:
            parts.append("keyword in the system prompt")
        return "; ".join(parts) or "matches every request"


@dataclass(frozen=True)
class Rule:
    name: str
    model: str
    when: Condition = field(default_factory=Condition)


_KEYWORD_CACHE: dict[tuple[str, ...], Lexicon] = {}


def _keywords(words: tuple[str, ...]) -> Lexicon:
    lexicon = _KEYWORD_CACHE.get(words)
    if lexicon is None:
        lexicon = _KEYWORD_CACHE[words] = Lexicon.of(words)
    return lexicon


class Router:
    """Rules, the default model and the name table of one config; `decide` is the only entry."""

    def __init__(
        self,
        rules: Sequence[Rule],
        default_model: str,
        names: Mapping[str, str],
        fallbacks: Mapping[str, str] | None = None,
        classifier: Classifier | None = None,
        min_confidence: float = 0.0,
    ) -> None:
        self.rules = tuple(rules)
        self.default_model = default_model
        self.names = dict(names)
        self.fallbacks = dict(fallbacks or {})
        # None: the hand-written scores decide alone (routing.classifier.enabled: false).
        self.classifier = classifier
        self.min_confidence = min_confidence

    def decide(self, inp: RouteInput) -> RouteDecision:
        if inp.model and inp.model != AUTO:
            model = self.names.get(inp.model)
            if model is None:
                raise UnknownModel(inp.model, list(self.names))
            how = "by name" if model == inp.model else f"by its alias {inp.model!r}"
            return RouteDecision(model, "explicit", f"the request asked for {model} {how}")
        signals = detect(inp, self.classifier, self.min_confidence)
        for rule in self.rules:
            if rule.when.holds(inp, signals):
                return RouteDecision(rule.model, rule.name, rule.when.describe(signals),
                                     signals.language if signals.code else None, signals)
        return RouteDecision(self.default_model, "default", _default_reason(signals),
                             None, signals)

    def fallback(self, model: str) -> str | None:
        return self.fallbacks.get(model)


def _default_reason(signals: Signals) -> str:
    if signals.decided_by != "rules":
        return f"no rule matched ({signals.verdict()})"
    return (f"no rule matched (code score {signals.code_score:g}, reasoning score "
            f"{signals.reasoning_score:g}, {signals.turns} user turns, "
            f"~{signals.prompt_tokens} prompt tokens)")


# --- signals of one request ----------------------------------------------------------------


def _window(text: str, size: int) -> str:
    if len(text) <= size:
        return text
    half = size // 2
    return f"{text[:half]}\n{text[-half:]}"


def _last_user(inp: RouteInput) -> str:
    for role, text in reversed(inp.messages):
        if role == "user":
            return _window(text, _LAST_WINDOW)
    return ""


def _system(inp: RouteInput) -> str:
    return "\n".join(_window(text, _CONTEXT_WINDOW) for role, text in inp.messages
                     if role in ("system", "developer"))


def detect(inp: RouteInput, classifier: Classifier | None = None,
           min_confidence: float = 0.0) -> Signals:
    """The request's signals; the last user message decides most, context adds a bounded part.
    With a classifier: the hybrid (see the module's docstring)."""
    if classifier is not None:
        return _hybrid(inp, classifier, min_confidence)
    messages = inp.messages
    last_index = -1
    turns = chars = 0
    for i, (role, text) in enumerate(messages):
        chars += len(text)
        if role == "user":
            turns += 1
            last_index = i
    last = Text(_window(messages[last_index][1], _LAST_WINDOW) if last_index >= 0 else "")
    code = score_code(last)
    # Code pasted in the last message wins over any reasoning signal (see below): skip it.
    reasoning = score_reasoning(last) if not code.structural else Score()
    own_code = code.score
    context: Text | None = None
    # A last message that is code or reasoning on its own decides; otherwise earlier turns
    # and the system prompt add their bounded share.
    decided = code.score >= THRESHOLD or reasoning.score >= THRESHOLD
    if not decided and len(messages) > 1:
        # The system prompt and the latest earlier turns, read as one text.
        earlier = [_window(text, _CONTEXT_WINDOW) for i, (role, text) in enumerate(messages)
                   if i != last_index and role != "tool"]
        earlier = [*earlier[:1], *earlier[1:][-_CONTEXT_MESSAGES:]] \
            if messages[0][0] in ("system", "developer") else earlier[-_CONTEXT_MESSAGES:]
        if earlier:
            context = Text("\n".join(earlier))
            code.plus(score_code(context), _CONTEXT_WEIGHT, _CONTEXT_CAP, "context")
            reasoning.plus(score_reasoning(context), _CONTEXT_WEIGHT, _CONTEXT_CAP, "context")

    is_code = code.score >= THRESHOLD
    is_reasoning = reasoning.score >= THRESHOLD
    if is_code and is_reasoning:
        # Code the user pasted or asks for wins over a problem statement that mentions code;
        # without such evidence the stronger signal does.
        if code.structural or code.score >= reasoning.score:
            is_reasoning = False
        else:
            is_code = False
    lang = None
    if is_code:
        lang = language(last) if own_code >= 1 else None
        if lang is None and context is not None:
            lang = language(context)
    return Signals(
        code=is_code, reasoning=is_reasoning, language=lang,
        code_score=round(code.score, 2), reasoning_score=round(reasoning.score, 2),
        turns=turns, prompt_tokens=(chars + 3) // 4,
        code_evidence=tuple(code.evidence), reasoning_evidence=tuple(reasoning.evidence),
    )


def _hybrid(inp: RouteInput, classifier: Classifier, min_confidence: float) -> Signals:
    messages = inp.messages
    turns = chars = 0
    for role, content in messages:
        chars += len(content)
        if role == "user":
            turns += 1
    tokens = (chars + 3) // 4
    last, context = classifier.split(messages)
    text = Text(last)
    code, reasoning = rule_scores(text)
    if code.structural or reasoning is None:
        # Code that is there (a fence, a trace, a diff, SQL, code lines): sure.
        return Signals(code=True, reasoning=False, language=language(text),
                       code_score=code.score, reasoning_score=0.0, turns=turns,
                       prompt_tokens=tokens, code_evidence=tuple(code.evidence),
                       decided_by="signal")
    verdict = classifier.score(last, context, inp.endpoint,
                               rules=rule_features(code, reasoning))
    confident = verdict.confidence >= min_confidence
    is_code = confident and verdict.label == "code"
    lang = None
    if is_code:
        lang = language(text)
        if lang is None and context:
            lang = language(Text(context))
    return Signals(
        code=is_code, reasoning=confident and verdict.label == "reasoning", language=lang,
        code_score=round(code.score, 2), reasoning_score=round(reasoning.score, 2),
        turns=turns, prompt_tokens=tokens, code_evidence=tuple(code.evidence),
        reasoning_evidence=tuple(reasoning.evidence), decided_by="classifier",
        classifier_label=verdict.label, confidence=round(verdict.confidence, 3),
        features=tuple(f"{name} {weight:+.2f}" for name, weight in verdict.top))


def rules_from_config(rules: Iterable[Mapping[str, Any]], names: Mapping[str, str]) -> list[Rule]:
    """Rules from the config's plain dicts (already validated); model aliases resolved."""
    out: list[Rule] = []
    for raw in rules:
        when = dict(raw.get("when") or {})
        languages = when.pop("languages", None)
        out.append(Rule(
            name=str(raw["name"]), model=names[str(raw["model"])],
            when=Condition(
                languages=frozenset(languages) if languages is not None else None,
                keywords=tuple(when.pop("keywords", ()) or ()),
                system_keywords=tuple(when.pop("system_keywords", ()) or ()),
                **when),
        ))
    return out

