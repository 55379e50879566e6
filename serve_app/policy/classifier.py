"""The learned part of routing: chat / code / reasoning from the request's text. Pure.

A multinomial logistic regression over a bag of cheap features (fastText-style, without the
hidden layer):

- the last user message (read in a bounded window, head and tail): its words (lowercased, every
  digit written as 0, Chinese and Japanese characters one by one), the pairs of adjacent words,
  character n-grams of each word (so "Dockerfile's", "kubernetes" and "deploymnet" still look
  like their relatives), which code and maths symbols occur, and its shape (lines, length);
- the earlier turns and the system prompt (bounded windows too): their words only, in a space
  of their own and at a lower weight, so context helps without deciding.

Features are binary, each part scaled by 1/sqrt(its feature count). A word's weight and the
mean of its n-grams' weights are summed once when the model loads, so a known word costs one
dictionary lookup per class; only unknown words are cut into n-grams (at most
`_MAX_UNKNOWN_WORDS` of them). The probabilities are softmax(logits / temperature), the
temperature fitted on out-of-fold predictions at training (serve_app/routing_train.py), so
"confidence 0.9" means right about nine times in ten on data like the training data.

The model file is gzipped JSON written by `roundhouse route train`; the one shipped with
Roundhouse is `router_model.json.gz` beside this module (`make router-model` rebuilds it).
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from serve_app.policy.signals import Text, rule_features, rule_scores

LABELS = ("chat", "code", "reasoning")
FORMAT = "roundhouse-router-classifier/1"
DEFAULT_MODEL_PATH = Path(__file__).with_name("router_model.json.gz")

# Featurisation settings; a model file records the ones it was trained with.
DEFAULT_SETTINGS: dict[str, Any] = {
    "last_window": 1600,  # characters of the last user message (head + tail)
    "context_window": 400,  # characters of each earlier message and of the system prompt
    "context_messages": 3,  # the latest earlier turns read (besides the system prompt)
    "context_weight": 0.5,  # the context part's scale relative to the last message's
    "ngrams": [3, 5],  # character n-gram lengths, inclusive, of "<word>"
    "ngram_weight": 4.0,  # a word's n-grams share this value (a word's own feature has 1)
    "embeddings": True,  # the static-embedding part (its table is empty when off)
    "rules": True,  # the hand-written scores of policy/signals.py as features
    "pairs": False,  # adjacent word pairs as features (no better in CV, and slower)
}
_MAX_UNKNOWN_WORDS = 64

# --- text to features ------------------------------------------------------------------------

# Chinese and Japanese (kana, CJK ideographs): one token per character (pairs then follow from
# adjacent tokens). Hangul has spaces between words, so it is read as words.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")
# UTF-8 lead bytes of U+3000..U+9FFF: a text without any has no Chinese/Japanese character.
_CJK_LEADS = tuple(bytes([b]) for b in range(0xE3, 0xEA))
_PUNCTUATION = "".join(chr(c) for c in range(33, 127) if not chr(c).isalnum())
# ASCII punctuation becomes spaces and every digit 0; done on UTF-8 bytes, which leaves other
# characters alone (str.translate with a mapping costs ~40 ns a character on non-ASCII text).
_ASCII_TABLE = bytes.maketrans((_PUNCTUATION + "123456789").encode(),
                               b" " * len(_PUNCTUATION) + b"000000000")
_UNICODE_PUNCTUATION = tuple(
                             "\u2019\u2018\u201c\u201d\u201e\u00ab\u00bb\u2039\u203a\u2014\u2013"
                             "\u2026\u00b7\u2022\u00bf\u00a1\u3001\u3002\uff0c\uff01\uff1f\uff1a"
                             "\uff1b\uff08\uff09\u3010\u3011\u300c\u300d\u300e\u300f\u300a\u300b"
                             "\u3008\u3009\uff5e")  # one character each
# Characters whose presence is a feature ("~{", "~="...).
SYMBOLS = "{}()[]<>;=`$%+*^/\\_#@|&~:\"'!?.,-"
_SYMBOL_FEATURES = tuple((c, "~" + c) for c in SYMBOLS)


def tokenize(text: str) -> list[str]:
    """Lowercase words, digits written as 0; Chinese/Japanese characters one by one."""
    low = text.lower()
    if low.isascii():
        return low.encode().translate(_ASCII_TABLE).decode().split()
    for mark in _UNICODE_PUNCTUATION:  # a test for one character is C-fast
        if mark in low:
            low = low.replace(mark, " ")
    data = low.encode("utf-8", "surrogatepass").translate(_ASCII_TABLE)
    words = data.decode("utf-8", "surrogatepass").split()
    if not any(lead in data for lead in _CJK_LEADS):
        return words
    out: list[str] = []
    for word in words:
        if word.isascii():
            out.append(word)
        else:
            out.extend(_WORD.findall(word))
    return out


def char_ngrams(word: str, low: int, high: int) -> list[str]:
    """fastText's subwords: the n-grams of "<word>" for n in [low, high] (with repeats), by n
    then position."""
    marked = f"<{word}>"
    size = len(marked)
    slices = _SLICES.get((size, low, high))
    if slices is None:
        slices = tuple(slice(i, i + n) for n in range(low, high + 1)
                       for i in range(size - n + 1))
        if size <= 48:
            _SLICES[(size, low, high)] = slices
    return list(map(marked.__getitem__, slices))


# (length of "<word>", low, high) -> the slices of its n-grams: cutting is then one C-level map.
_SLICES: dict[tuple[int, int, int], tuple[slice, ...]] = {}


def has_ngrams(word: str) -> bool:
    """Words that get subword features: three characters or more, not a number, not a lone
    Chinese/Japanese character."""
    return len(word) >= 3 and not word.isdigit()


def shape_features(raw: str, tokens: Sequence[str], endpoint: str, context: str) -> list[str]:
    """Symbols present, line count, length, endpoint, whether there is context (and code
    fenced in it)."""
    out = [name for c, name in _SYMBOL_FEATURES if c in raw]
    lines = raw.count("\n")
    out.append("~lines0" if lines == 0 else "~lines1" if lines < 3 else "~lines3"
               if lines < 10 else "~lines10")
    n = len(tokens)
    out.append("~len0" if n <= 5 else "~len6" if n <= 15 else "~len16" if n <= 40
               else "~len41" if n <= 120 else "~len121")
    if endpoint == "completions":
        out.append("~completions")
    if context:
        out.append("~context")
        if "```" in context:
            out.append("~contextfence")
    if not raw.isascii():
        out.append("~nonascii")
    return out


def window(text: str, size: int) -> str:
    """The text, or its head and tail when it is longer than `size` characters."""
    if len(text) <= size:
        return text
    half = size // 2
    return f"{text[:half]}\n{text[-half:]}"


def split_messages(messages: Sequence[tuple[str, str]], last_window: int, context_window: int,
                   context_messages: int) -> tuple[str, str]:
    """(the last user message, the context) in bounded windows. The context is the system
    prompt and the latest earlier turns (tool output left out)."""
    last_index = -1
    for i in range(len(messages) - 1, -1, -1):
        if messages[i][0] == "user":
            last_index = i
            break
    last = window(messages[last_index][1], last_window) if last_index >= 0 else ""
    system: list[str] = []
    earlier: list[str] = []
    for i, (role, text) in enumerate(messages):
        if i == last_index or role == "tool" or not text:
            continue
        if role in ("system", "developer"):
            if not system:
                system.append(window(text, context_window))
        else:
            earlier.append(text)
    parts = system + [window(t, context_window) for t in earlier[-context_messages:]]
    return last, "\n".join(parts)


@dataclass(frozen=True)
class Features:
    """One request's features, as training sees them (inference computes the same sums without
    building this)."""

    words: tuple[str, ...]  # unique words of the last message, in order of appearance
    pairs: tuple[tuple[str, str], ...]  # unique adjacent word pairs
    shape: tuple[str, ...]  # symbol and shape features
    context: tuple[str, ...]  # unique words of the context


def features(last: str, context: str, endpoint: str, rules: bool = True,
             pairs: bool = True) -> Features:
    tokens = tokenize(last)
    shape = shape_features(last, tokens, endpoint, context)
    if rules:
        shape.extend(rule_features(*rule_scores(Text(last))))
    return Features(
        words=tuple(dict.fromkeys(tokens)),
        pairs=tuple(dict.fromkeys(zip(tokens, tokens[1:], strict=False))) if pairs else (),
        shape=tuple(shape),
        context=tuple(dict.fromkeys(tokenize(context))) if context else (),
    )


# --- the model ---------------------------------------------------------------------------------


class ModelError(ValueError):
    """A model file that cannot be used; the message says which file and why."""


class Verdict(NamedTuple):
    label: str
    confidence: float  # calibrated probability of `label`
    probabilities: tuple[float, ...]  # per LABELS
    # What pushed most toward `label`: model feature names (see `feature_name`) and the logit
    # each added over the mean of the other labels. Never text outside the model's vocabulary.
    top: tuple[tuple[str, float], ...]


_ZERO: tuple[float, ...] = (0.0, 0.0, 0.0)
_NO_COLUMNS: list[tuple[Any, ...]] = [()] * 8
_SUBWORD_CACHE_SIZE = 50_000


class Classifier:
    """A trained model, ready to score requests (`predict`). Load with `load_model`."""

    def __init__(self, data: Mapping[str, Any], source: str = "") -> None:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, Mapping) else None
            raise ModelError(f"{source}: not a Roundhouse router model (format "
                             f"{str(found)[:60]!r}, expected {FORMAT!r})")
        try:
            if tuple(data["labels"]) != LABELS:
                raise ModelError(f"{source}: labels {list(data['labels'])} differ from "
                                 f"{list(LABELS)}")
            self.source = source
            self.settings = {**DEFAULT_SETTINGS, **data.get("settings", {})}
            self.meta: dict[str, Any] = dict(data.get("meta", {}))
            scale = float(data["scale"])
            self.temperature = float(data["temperature"])
            if not (self.temperature > 0 and scale > 0):
                raise ModelError(f"{source}: temperature and scale must be positive")
            bias = (0.0, *(float(b) / scale for b in data["bias"]))
            if len(bias) != len(LABELS):
                raise ModelError(f"{source}: the bias is not one per label but the first")
            self.bias = bias
            tables = data["weights"]
            words = _table(tables["words"], scale)
            ngrams = _table(tables["ngrams"], scale)
            pairs = _table(tables["pairs"], scale)
            shape = _table(tables["shape"], scale)
            context = _table(tables["context"], scale)
            embed = _table(tables.get("embed", {}), scale)
            self._low, self._high = (int(n) for n in self.settings["ngrams"])
            self._last_window = int(self.settings["last_window"])
            self._context_window = int(self.settings["context_window"])
            self._context_messages = int(self.settings["context_messages"])
            self._context_weight = float(self.settings["context_weight"])
            self._ngram_weight = float(self.settings["ngram_weight"])
            self._rules = bool(self.settings["rules"])
            self._pairs = bool(self.settings["pairs"])
        except ModelError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelError(f"{source}: malformed model file ({type(exc).__name__}: "
                             f"{str(exc)[:120]})") from None
        # Softmax does not change when one feature adds the same to every label, so each
        # feature's weights are stored centred (mean 0): a weight is then also what the feature
        # adds to its label over the mean of the others (x 1.5), which explanations show.
        ngrams = {k: _centred(v) for k, v in ngrams.items()}
        self._ngrams = ngrams
        self._subwords: dict[str, tuple[float, ...]] = {}
        # One table for the last message, so each feature costs one lookup: words (their
        # weight plus the mean of their n-grams'; every word the model lists, so the others are
        # the unknown ones), word pairs (tuples) and shape features ("~..."); the key spaces
        # cannot collide. An entry: the three label weights, the word's static-embedding
        # logits (three), 1.0 if it has an embedding, and the feature itself.
        table: dict[Any, tuple[Any, ...]] = {}
        embedded = {k: _centred(v) for k, v in embed.items()}
        for word in sorted(set(words) | set(embedded)):
            own = _add(_centred(words[word]), self._subword(word)) if word in words \
                else self._subword(word)
            vector = embedded.get(word)
            table[word] = (*own, *(vector or _ZERO), 1.0 if vector else 0.0, word)
        for key, weights in pairs.items():
            first, _, second = key.partition(" ")
            table[(first, second)] = (*_centred(weights), *_ZERO, 0.0, (first, second))
        for key, weights in shape.items():
            table[key] = (*_centred(weights), *_ZERO, 0.0, key)
        self._table = table
        self._context = {k: _centred(v) for k, v in context.items()}
        self._context_keys = frozenset(context)

    def _subword(self, word: str) -> tuple[float, ...]:
        """The mean weight of the word's n-grams (unknown n-grams weigh 0), times the n-gram
        weight."""
        if not has_ngrams(word):
            return _ZERO
        grams = char_ngrams(word, self._low, self._high)
        found = list(zip(*filter(None, map(self._ngrams.get, grams)), strict=True))
        if not found:
            return _ZERO
        share = self._ngram_weight / len(grams)
        return (sum(found[0]) * share, sum(found[1]) * share, sum(found[2]) * share)

    def _unknown(self, word: str) -> tuple[float, ...]:
        """_subword of a word outside the vocabulary, remembered (a bounded cache)."""
        found = self._subwords.get(word)
        if found is None:
            if len(self._subwords) >= _SUBWORD_CACHE_SIZE:
                self._subwords.clear()
            found = self._subwords[word] = self._subword(word)
        return found

    # --- scoring ------------------------------------------------------------------------------

    def split(self, messages: Sequence[tuple[str, str]]) -> tuple[str, str]:
        return split_messages(messages, self._last_window, self._context_window,
                              self._context_messages)

    def score(self, last: str, context: str, endpoint: str, explain: int = 3,
              rules: Sequence[str] | None = None) -> Verdict:
        """The verdict on a last user message and its context (as `split` returns them).
        `rules`: the rule features of `last` (signals.rule_features), when the caller has
        them; computed here otherwise (if the model uses them)."""
        tokens = tokenize(last)
        words = set(tokens)
        found: set[Any] = set(words)
        if self._pairs:
            found.update(zip(tokens, tokens[1:], strict=False))
        found.update(shape_features(last, tokens, endpoint, context))
        if self._rules:
            found.update(rules if rules is not None else rule_features(*rule_scores(Text(last))))
        entries = list(filter(None, map(self._table.get, found)))
        scale = 1.0 / math.sqrt(len(found)) if found else 0.0
        # Per column (label weights, embedding logits, has-embedding, feature): one C pass.
        columns = list(zip(*entries, strict=True)) if entries else _NO_COLUMNS
        sub: tuple[float, ...] = _ZERO
        if len(entries) < len(found):
            unknown: Any = words.difference(self._table)
            if len(unknown) > _MAX_UNKNOWN_WORDS:  # the first ones, as at training
                unknown = [w for w in dict.fromkeys(tokens) if w in unknown and has_ngrams(w)
                           ][:_MAX_UNKNOWN_WORDS]
            if unknown:
                sub = tuple(map(sum, zip(*map(self._unknown, unknown), strict=True)))
        b0, b1, b2 = self.bias
        logits = [b0 + (sum(columns[0]) + sub[0]) * scale,
                  b1 + (sum(columns[1]) + sub[1]) * scale,
                  b2 + (sum(columns[2]) + sub[2]) * scale]
        meaning = [0.0, 0.0, 0.0]
        with_vectors = sum(columns[6])
        if with_vectors:
            share = 1.0 / with_vectors
            meaning = [sum(columns[3]) * share, sum(columns[4]) * share,
                       sum(columns[5]) * share]
            logits = [x + m for x, m in zip(logits, meaning, strict=True)]
        ccolumns: list[tuple[float, ...]] = []
        cscale = 0.0
        if context:
            ctokens = set(tokenize(context))
            cpresent = self._context_keys.intersection(ctokens)
            if cpresent:
                cscale = self._context_weight / math.sqrt(len(ctokens))
                ccolumns = list(zip(*map(self._context.__getitem__, cpresent), strict=True))
                logits[0] += sum(ccolumns[0]) * cscale
                logits[1] += sum(ccolumns[1]) * cscale
                logits[2] += sum(ccolumns[2]) * cscale
        probs = self.probabilities(logits)
        best = 0 if probs[0] >= probs[1] and probs[0] >= probs[2] else \
            1 if probs[1] >= probs[2] else 2
        top: tuple[tuple[str, float], ...] = ()
        if explain:
            ranked: list[tuple[float, str]] = []
            values = columns[best]
            if values:
                order = sorted(range(len(values)), key=values.__getitem__)[-explain:]
                names = columns[7]
                ranked = [(values[i] * scale * 1.5, feature_name(names[i])) for i in order]
            if sub[best] > 0:
                ranked.append((sub[best] * scale * 1.5, "subwords of unknown words"))
            if ccolumns:
                ranked.append((sum(ccolumns[best]) * cscale * 1.5, "context"))
            if meaning[best] > 0:
                ranked.append((meaning[best] * 1.5, "word meanings (embeddings)"))
            ranked.sort(reverse=True)
            top = tuple((name, round(value, 2)) for value, name in ranked[:explain] if value > 0)
        return Verdict(LABELS[best], probs[best], probs, top)

    def probabilities(self, logits: Sequence[float]) -> tuple[float, ...]:
        t = self.temperature
        a, b, c = logits[0] / t, logits[1] / t, logits[2] / t
        top = max(a, b, c)
        ea, eb, ec = math.exp(a - top), math.exp(b - top), math.exp(c - top)
        total = ea + eb + ec
        return (ea / total, eb / total, ec / total)

    def predict(self, messages: Sequence[tuple[str, str]], endpoint: str = "chat",
                explain: int = 3) -> Verdict:
        last, context = self.split(messages)
        return self.score(last, context, endpoint, explain)


_SHAPE_NAMES = {
    "~lines0": "one line", "~lines1": "2-3 lines", "~lines3": "4-10 lines",
    "~lines10": "over 10 lines", "~len0": "<= 5 words", "~len6": "6-15 words",
    "~len16": "16-40 words", "~len41": "41-120 words", "~len121": "over 120 words",
    "~completions": "completions endpoint", "~context": "has context",
    "~nonascii": "non-ASCII text", "~contextfence": "code block in context",
}


_LEVELS = {"0": "<1.5", "1": "1.5-3", "2": "3-5", "3": ">=5"}


def feature_name(feature: Any) -> str:
    """How a model feature is shown: a word or word pair as such, a number as its digit count,
    a shape feature by what it means ('symbol {', 'one line')."""
    if isinstance(feature, tuple):
        return " ".join(_word_name(w) for w in feature)
    if feature.startswith("~"):
        if feature.startswith("~ev:"):
            return f"rule {feature[4:]}"  # "rule reasoning:puzzle"
        if feature.startswith("~rule:"):
            kind, level = feature[6:-1], feature[-1:]
            return f"rule {kind} score {_LEVELS.get(level, level)}"
        return _SHAPE_NAMES.get(feature) or f"symbol {feature[1:]}"
    return _word_name(feature)


def _word_name(word: str) -> str:
    if word.isdigit():
        return f"<{len(word)}-digit number>"
    return word


def _table(raw: Mapping[str, Sequence[int]], scale: float) -> dict[str, tuple[float, ...]]:
    """Stored weights are relative to the first label's (which is left out)."""
    out: dict[str, tuple[float, ...]] = {}
    for key, values in raw.items():
        if len(values) != len(LABELS) - 1:
            raise ModelError(f"weights of {key!r} are not one per label but the first")
        out[str(key)] = (0.0, *(float(v) / scale for v in values))
    return out


def _add(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def _centred(weights: tuple[float, ...]) -> tuple[float, ...]:
    mean = sum(weights) / len(weights)
    return tuple(w - mean for w in weights)


# --- loading -----------------------------------------------------------------------------------

_CACHE: dict[tuple[str, int, int], Classifier] = {}


def load_model(path: str | Path | None = None) -> Classifier:
    """The model in `path` (None: the shipped one), loaded once per file version."""
    file = Path(path) if path is not None else DEFAULT_MODEL_PATH
    try:
        stat = file.stat()
    except OSError as exc:
        raise ModelError(f"cannot read the model file {str(file)!r}: "
                         f"{exc.strerror or exc}") from None
    key = (str(file.resolve()), stat.st_mtime_ns, stat.st_size)
    model = _CACHE.get(key)
    if model is None:
        model = _CACHE[key] = Classifier(read_model_file(file), str(file))
    return model


def read_model_file(file: Path) -> dict[str, Any]:
    try:
        raw = file.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        data = json.loads(raw)
    except OSError as exc:
        raise ModelError(f"{file}: cannot read the model file: {exc}") from None
    except (ValueError, EOFError) as exc:
        raise ModelError(f"{file}: not a model file written by `roundhouse route train` "
                         f"({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{file}: not a model file written by `roundhouse route train`")
    return data


def dump_model(data: Mapping[str, Any]) -> bytes:
    """The model file's bytes: canonical JSON, gzipped without a timestamp (same model, same
    bytes)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))  # ASCII only
    return gzip.compress(text.encode(), compresslevel=9, mtime=0)
