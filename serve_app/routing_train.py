"""Training the router's classifier (serve_app/policy/classifier.py) from labeled requests.

`roundhouse route train --data FILE.jsonl [--data ...] --out MODEL` runs `train_files`. Input
lines are request bodies with a `label` (chat, code or reasoning), as in data/routing/ and
tests/data/routing_eval.jsonl (docs/routing-labels.md says how to label). Needs numpy, which is
installed with Ray; never imported on the request path.

Reproducible: examples are deduplicated and put in a canonical order, the optimiser is
full-batch L-BFGS with no randomness, the folds come from a hash of each example, and sums are
sequential (numpy's bincount), so the same data gives the same model file, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serve_app.policy.classifier import (
    _MAX_UNKNOWN_WORDS,
    DEFAULT_SETTINGS,
    FORMAT,
    LABELS,
    Classifier,
    Features,
    char_ngrams,
    dump_model,
    features,
    has_ngrams,
    split_messages,
    tokenize,
)

# Chosen by cross-validation on data/routing/train-*.jsonl (docs/routing.md).
DEFAULT_HYPER: dict[str, Any] = {
    "l2": 3e-5,  # L2 penalty on the weights (mean log-loss + l2/2 |W|^2)
    "min_df": 2,  # features other than words need this many training examples
    "balanced": True,  # weight each class by 1/its share of the examples
    "iterations": 300,  # L-BFGS iterations at most
    "folds": 5,  # for the temperature (out-of-fold predictions) and the reported CV accuracy
    "embed_l2": 1e-3,  # L2 penalty of the static-embedding part
    "embed_weight": 0.5,  # its logits' weight in the sum with the n-gram part's
}
SCALE = 1000  # weights are stored as integers in thousandths, relative to the first label


class DataError(ValueError):
    """A labeled line that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    label: int
    endpoint: str
    messages: tuple[tuple[str, str], ...]
    key: str  # sha256 of the canonical request: order and folds


def _content(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(str(p.get("text", "")) for p in value
                       if isinstance(p, dict) and p.get("type", "text") == "text")
    raise ValueError("content must be a string or a list of parts")


def example(row: dict[str, Any]) -> Example:
    """One labeled request body -> an Example (the router's view of the request)."""
    label = row.get("label")
    if label not in LABELS:
        raise ValueError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
    if "messages" in row:
        raw = row["messages"]
        if not isinstance(raw, list) or not raw:
            raise ValueError("messages must be a non-empty list")
        messages = tuple((str(m.get("role", "user")), _content(m.get("content")))
                         for m in raw)
        endpoint = "chat"
    elif "prompt" in row:
        prompt = row["prompt"]
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        messages = tuple(("user", str(p)) for p in prompts[:4])
        endpoint = "completions"
    else:
        raise ValueError("a labeled line needs 'messages' or 'prompt'")
    canonical = json.dumps([endpoint, messages], ensure_ascii=False, separators=(",", ":"))
    return Example(LABELS.index(label), endpoint, messages,
                   hashlib.sha256(canonical.encode()).hexdigest())


def read_examples(paths: Iterable[str | Path]) -> tuple[list[Example], list[str]]:
    """Examples of the files, deduplicated (the first label of a repeated request wins) and in
    canonical order; and the sha256 of each file, for the record."""
    seen: dict[str, Example] = {}
    digests: list[str] = []
    for path in paths:
        data = Path(path).read_bytes()
        digests.append(f"{Path(path).name}:{hashlib.sha256(data).hexdigest()[:16]}")
        for number, line in enumerate(data.decode().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
                ex = example(row)
            except (ValueError, AttributeError, TypeError) as exc:
                raise DataError(f"{path}:{number}: {exc}") from None
            seen.setdefault(ex.key, ex)
    if not seen:
        raise DataError("no labeled examples in " + ", ".join(str(p) for p in paths))
    return sorted(seen.values(), key=lambda e: e.key), digests


def example_texts(ex: Example, settings: dict[str, Any]) -> tuple[str, str]:
    """(last user message, context) in the windows the classifier reads."""
    return split_messages(ex.messages, int(settings["last_window"]),
                          int(settings["context_window"]), int(settings["context_messages"]))


def example_features(ex: Example, settings: dict[str, Any]) -> Features:
    return features(*example_texts(ex, settings), ex.endpoint, bool(settings["rules"]),
                    bool(settings["pairs"]))


# --- the design matrix -------------------------------------------------------------------------


@dataclass
class Vocabulary:
    """Column of each feature: words, n-grams, word pairs, shape, context words."""

    words: dict[str, int] = field(default_factory=dict)
    ngrams: dict[str, int] = field(default_factory=dict)
    pairs: dict[tuple[str, str], int] = field(default_factory=dict)
    shape: dict[str, int] = field(default_factory=dict)
    context: dict[str, int] = field(default_factory=dict)
    size: int = 0

    def add(self, table: dict[Any, int], keys: Iterable[Any]) -> None:
        for key in keys:
            table[key] = self.size
            self.size += 1


def _df(items: Iterable[Iterable[Any]]) -> dict[Any, int]:
    counts: dict[Any, int] = {}
    for doc in items:
        for x in set(doc):
            counts[x] = counts.get(x, 0) + 1
    return counts


def build_vocabulary(docs: Sequence[Features], settings: dict[str, Any], min_df: int
                     ) -> Vocabulary:
    low, high = (int(n) for n in settings["ngrams"])
    v = Vocabulary()
    v.add(v.words, sorted(_df(d.words for d in docs)))
    grams = _df([g for w in d.words if has_ngrams(w) for g in char_ngrams(w, low, high)]
                for d in docs)
    v.add(v.ngrams, sorted(g for g, n in grams.items() if n >= min_df))
    v.add(v.pairs, sorted(p for p, n in _df(d.pairs for d in docs).items() if n >= min_df))
    v.add(v.shape, sorted(_df(d.shape for d in docs)))
    v.add(v.context, sorted(w for w, n in _df(d.context for d in docs).items() if n >= min_df))
    return v


@dataclass
class Matrix:
    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray
    n: int
    d: int

    def dot(self, w: np.ndarray) -> np.ndarray:
        """X @ w for w of shape (d, k)."""
        return np.stack([np.bincount(self.rows, weights=self.vals * w[self.cols, c],
                                     minlength=self.n) for c in range(w.shape[1])], axis=1)

    def tdot(self, r: np.ndarray) -> np.ndarray:
        """X.T @ r for r of shape (n, k)."""
        return np.stack([np.bincount(self.cols, weights=self.vals * r[self.rows, c],
                                     minlength=self.d) for c in range(r.shape[1])], axis=1)

    def take(self, index: np.ndarray) -> Matrix:
        keep = np.zeros(self.n, dtype=bool)
        keep[index] = True
        renumber = np.full(self.n, -1, dtype=np.int64)
        renumber[index] = np.arange(len(index))
        mask = keep[self.rows]
        return Matrix(renumber[self.rows[mask]], self.cols[mask], self.vals[mask],
                      len(index), self.d)


def design(docs: Sequence[Features], v: Vocabulary, settings: dict[str, Any],
           known: frozenset[str] = frozenset()) -> Matrix:
    """The matrix the classifier's `score` computes with: each doc's features scaled as at
    inference (see serve_app/policy/classifier.py). `known`: words the model file lists
    besides the vocabulary's (those with a static embedding): not unknown for the cap."""
    low, high = (int(n) for n in settings["ngrams"])
    weight = float(settings["context_weight"])
    ngram_weight = float(settings["ngram_weight"])
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for i, f in enumerate(docs):
        n = len(f.words) + len(f.pairs) + len(f.shape)
        scale = 1.0 / math.sqrt(n) if n else 0.0
        entries: dict[int, float] = {}
        unknown = 0
        for word in f.words:
            col = v.words.get(word)
            if col is not None:
                entries[col] = entries.get(col, 0.0) + scale
            elif has_ngrams(word) and word not in known:
                unknown += 1
                if unknown > _MAX_UNKNOWN_WORDS:
                    continue
            if not has_ngrams(word):
                continue
            grams = char_ngrams(word, low, high)
            share = scale * ngram_weight / len(grams)
            for g in grams:
                gcol = v.ngrams.get(g)
                if gcol is not None:
                    entries[gcol] = entries.get(gcol, 0.0) + share
        for pair in f.pairs:
            col = v.pairs.get(pair)
            if col is not None:
                entries[col] = entries.get(col, 0.0) + scale
        for name in f.shape:
            col = v.shape.get(name)
            if col is not None:
                entries[col] = entries.get(col, 0.0) + scale
        if f.context:
            cscale = weight / math.sqrt(len(f.context))
            for word in f.context:
                col = v.context.get(word)
                if col is not None:
                    entries[col] = entries.get(col, 0.0) + cscale
        for col in sorted(entries):
            rows.append(i)
            cols.append(col)
            vals.append(entries[col])
    return Matrix(np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64),
                  np.array(vals, dtype=np.float64), len(docs), v.size)


# --- fitting -----------------------------------------------------------------------------------


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def fit(x: Matrix, y: np.ndarray, l2: float, iterations: int, balanced: bool
        ) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by L-BFGS: weights (d, k) and bias (k,)."""
    k = len(LABELS)
    onehot = np.zeros((x.n, k))
    onehot[np.arange(x.n), y] = 1.0
    counts = np.bincount(y, minlength=k).astype(np.float64)
    if balanced:
        sample = (x.n / (k * np.maximum(counts, 1.0)))[y]
    else:
        sample = np.ones(x.n)
    sample = sample / sample.sum()

    def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta[:-k].reshape(x.d, k)
        b = theta[-k:]
        z = x.dot(w) + b
        z = z - z.max(axis=1, keepdims=True)
        logsum = np.log(np.exp(z).sum(axis=1))
        nll = float(np.dot(sample, logsum - (z * onehot).sum(axis=1)))
        p = _softmax(z)
        r = (p - onehot) * sample[:, None]
        gw = x.tdot(r) + l2 * w
        gb = r.sum(axis=0)
        value = nll + 0.5 * l2 * float(np.dot(w.ravel(), w.ravel()))
        return value, np.concatenate([gw.ravel(), gb])

    theta = _lbfgs(loss_grad, np.zeros(x.d * k + k), iterations)
    return theta[:-k].reshape(x.d, k), theta[-k:]


def _lbfgs(fun: Any, theta: np.ndarray, iterations: int, memory: int = 10,
           tol: float = 1e-7) -> np.ndarray:
    value, grad = fun(theta)
    history: list[tuple[np.ndarray, np.ndarray, float]] = []
    for _ in range(iterations):
        q = grad.copy()
        alphas: list[float] = []
        for s, yv, rho in reversed(history):
            a = rho * float(np.dot(s, q))
            alphas.append(a)
            q -= a * yv
        if history:
            s, yv, _rho = history[-1]
            q *= float(np.dot(s, yv)) / float(np.dot(yv, yv))
        for (s, yv, rho), a in zip(history, reversed(alphas), strict=True):
            beta = rho * float(np.dot(yv, q))
            q += (a - beta) * s
        direction = -q
        slope = float(np.dot(grad, direction))
        if slope >= 0:
            direction, slope, history = -grad, -float(np.dot(grad, grad)), []
        step = 1.0 if history else min(1.0, 1.0 / max(float(np.abs(grad).sum()), 1e-12))
        for _ in range(40):
            new_theta = theta + step * direction
            new_value, new_grad = fun(new_theta)
            if new_value <= value + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            break
        s_k, y_k = new_theta - theta, new_grad - grad
        sy = float(np.dot(s_k, y_k))
        if sy > 1e-12:
            history.append((s_k, y_k, 1.0 / sy))
            history = history[-memory:]
        improvement = value - new_value
        theta, value, grad = new_theta, new_value, new_grad
        if improvement < tol * max(abs(value), 1.0):
            break
    return theta


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature that minimises the log-loss of out-of-fold predictions (grid)."""
    best, best_t = math.inf, 1.0
    for t in [round(0.25 + 0.05 * i, 2) for i in range(76)]:
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        nll = float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))
        if nll < best - 1e-12:
            best, best_t = nll, t
    return best_t


# --- static word embeddings ----------------------------------------------------------------------


def word_vectors(words: Sequence[str]) -> np.ndarray:
    """The static embedding of each word: the mean of its wordllama token vectors (256-d; the
    weights ship inside the `wordllama` wheel, nothing is downloaded). Training only."""
    try:
        import wordllama
        from wordllama import WordLlama
    except ImportError as exc:
        raise DataError("training needs the `wordllama` package (pip install wordllama), or "
                        "settings {'embeddings': false}") from exc
    wl = WordLlama.load(cache_dir=Path(wordllama.__file__).parent, disable_download=True)
    if not words:
        return np.zeros((0, 256))
    return np.asarray(wl.embed(list(words), norm=False), dtype=np.float64)


def base_lexicon() -> list[str]:
    """Words of the embedding model's own vocabulary that the classifier's tokenizer produces:
    whole-word tokens (lowercased) and single Chinese/Japanese characters."""
    import wordllama
    from wordllama import WordLlama

    wl = WordLlama.load(cache_dir=Path(wordllama.__file__).parent, disable_download=True)
    out: set[str] = set()
    for piece in wl.tokenizer.get_vocab():
        word = piece[1:].lower() if piece.startswith("\u2581") else piece
        if len(word) >= 2 and word.isalpha() or len(word) == 1 and "\u3040" <= word <= "\u9fff":
            if tokenize(word) == [word]:
                out.add(word)
    return sorted(out)


def mean_vectors(docs: Sequence[Features], vectors: dict[str, np.ndarray]) -> Matrix:
    """Each doc's mean embedding over its words that have one (zero when none): as the
    classifier computes it."""
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    dim = len(next(iter(vectors.values()))) if vectors else 0
    for i, f in enumerate(docs):
        found = [vectors[w] for w in f.words if w in vectors]
        if not found:
            continue
        mean = np.sum(found, axis=0) / len(found)
        rows.append(np.full(dim, i, dtype=np.int64))
        cols.append(np.arange(dim, dtype=np.int64))
        vals.append(mean)
    if not rows:
        return Matrix(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), len(docs), dim)
    return Matrix(np.concatenate(rows), np.concatenate(cols), np.concatenate(vals), len(docs),
                  dim)


@dataclass
class Fitted:
    """Both parts of a fitted model: the n-gram part (vocabulary, weights, bias) and the
    embedding part (word vectors, weights, bias; empty when embeddings are off)."""

    vocab: Vocabulary
    w: np.ndarray
    b: np.ndarray
    vectors: dict[str, np.ndarray]
    ew: np.ndarray
    eb: np.ndarray
    embed_weight: float

    def logits(self, docs: Sequence[Features], settings: dict[str, Any]) -> np.ndarray:
        out: np.ndarray = design(docs, self.vocab, settings, frozenset(self.vectors)
                                 ).dot(self.w) + self.b
        if self.vectors:
            out = out + self.embed_weight * (mean_vectors(docs, self.vectors).dot(self.ew)
                                             + self.eb)
        return out


def fit_all(docs: Sequence[Features], y: np.ndarray, settings: dict[str, Any],
            hyper: dict[str, Any], lexicon: Sequence[str]) -> Fitted:
    k = len(LABELS)
    if not settings.get("embeddings", True):
        vocab, w, b = _fit_docs(docs, y, settings, hyper)
        return Fitted(vocab, w, b, {}, np.zeros((0, k)), np.zeros(k), 0.0)
    words = sorted(set(lexicon) | {w for d in docs for w in d.words if len(tokenize(w)) == 1})
    vocab, w, b = _fit_docs(docs, y, settings, hyper, frozenset(words))
    vectors = dict(zip(words, word_vectors(words), strict=True))
    ew, eb = fit(mean_vectors(docs, vectors), y, float(hyper["embed_l2"]),
                 int(hyper["iterations"]), bool(hyper["balanced"]))
    return Fitted(vocab, w, b, vectors, ew, eb, float(hyper["embed_weight"]))


# --- training ----------------------------------------------------------------------------------


@dataclass
class Report:
    examples: int
    per_label: dict[str, int]
    train_accuracy: float
    cv_accuracy: float | None
    cv_confusion: list[list[int]] | None
    temperature: float
    cv_ece: float | None
    features: dict[str, int]
    seconds: float

    def text(self) -> str:
        lines = [f"examples {self.examples} ({', '.join(f'{k} {v}' for k, v in self.per_label.items())})",
                 f"features {sum(self.features.values())} "
                 f"({', '.join(f'{k} {v}' for k, v in self.features.items())})",
                 f"training accuracy {self.train_accuracy:.3f}"]
        if self.cv_accuracy is not None and self.cv_confusion is not None:
            lines.append(f"cross-validated accuracy {self.cv_accuracy:.3f}, calibration error "
                         f"{self.cv_ece:.3f} (temperature {self.temperature:g})")
            lines.append(confusion_table(self.cv_confusion))
        lines.append(f"{self.seconds:.1f} s")
        return "\n".join(lines)


def confusion_table(matrix: Sequence[Sequence[int]]) -> str:
    corner = "label \\ routed"
    out = [f"{corner:>16}" + "".join(f"{got:>11}" for got in LABELS)]
    for i, want in enumerate(LABELS):
        out.append(f"{want:>16}" + "".join(f"{matrix[i][j]:>11}" for j in range(len(LABELS))))
    return "\n".join(out)


def _fold_of(key: str, folds: int) -> int:
    return int(key[:8], 16) % folds


def _fit_docs(docs: Sequence[Features], y: np.ndarray, settings: dict[str, Any],
              hyper: dict[str, Any], known: frozenset[str] = frozenset()
              ) -> tuple[Vocabulary, np.ndarray, np.ndarray]:
    v = build_vocabulary(docs, settings, int(hyper["min_df"]))
    x = design(docs, v, settings, known)
    w, b = fit(x, y, float(hyper["l2"]), int(hyper["iterations"]), bool(hyper["balanced"]))
    return v, w, b


def _relative(weights: np.ndarray) -> np.ndarray:
    """Weights relative to the first label's, in thousandths, without that (zero) column:
    softmax does not change when a feature adds the same to every label."""
    out: np.ndarray = np.round((weights[:, 1:] - weights[:, :1]) * SCALE).astype(np.int64)
    return out


def _model_dict(fitted: Fitted, settings: dict[str, Any], hyper: dict[str, Any],
                temperature: float, meta: dict[str, Any]) -> dict[str, Any]:
    v, w, b = fitted.vocab, fitted.w, fitted.b
    q = _relative(w)
    bias = b + fitted.embed_weight * fitted.eb if fitted.vectors else b
    embed: dict[str, list[int]] = {}
    if fitted.vectors:
        words = sorted(fitted.vectors)
        projected = _relative(np.array([fitted.vectors[x] for x in words]) @ fitted.ew
                              * fitted.embed_weight)
        embed = {x: [int(n) for n in row] for x, row in zip(words, projected, strict=True)}

    def table(cols: dict[Any, int], name: Any = str, keep_all: bool = False
              ) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for key, col in cols.items():
            row = q[col]
            if keep_all or row.any():
                out[name(key)] = [int(x) for x in row]
        return out

    return {
        "format": FORMAT,
        "labels": list(LABELS),
        "settings": settings,
        "scale": SCALE,
        "temperature": temperature,
        "bias": [int(x) for x in _relative(bias[None, :])[0]],
        "weights": {
            # Every word, even at 0: a word listed is not unknown (the cap on unknown words).
            "words": table(v.words, keep_all=True),
            "ngrams": table(v.ngrams),
            "pairs": table(v.pairs, lambda p: f"{p[0]} {p[1]}"),
            "shape": table(v.shape),
            "context": table(v.context),
            # Every word with a static embedding, even at 0: the mean counts them all.
            "embed": embed,
        },
        "meta": {"hyper": hyper, **meta},
    }


def _ece(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    conf = probs.max(axis=1)
    right = (probs.argmax(axis=1) == y).astype(np.float64)
    total = 0.0
    for i in range(bins):
        lo, hi = i / bins, (i + 1) / bins
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            total += mask.sum() / len(y) * abs(float(conf[mask].mean() - right[mask].mean()))
    return total


def train(examples: Sequence[Example], settings: dict[str, Any] | None = None,
          hyper: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
          cv: bool = True) -> tuple[dict[str, Any], Report]:
    """The model file's content and a report. With `cv`, out-of-fold predictions fit the
    temperature and give the cross-validated accuracy (folds+1 fits instead of one)."""
    from threadpoolctl import threadpool_limits

    # One BLAS thread: a multi-threaded dot product sums in an order that depends on the
    # machine's cores and load, and the same data must give the same bytes everywhere.
    with threadpool_limits(limits=1):
        return _train(examples, settings, hyper, meta, cv)


def _train(examples: Sequence[Example], settings: dict[str, Any] | None,
           hyper: dict[str, Any] | None, meta: dict[str, Any] | None,
           cv: bool) -> tuple[dict[str, Any], Report]:
    start = time.perf_counter()
    settings = {**DEFAULT_SETTINGS, **(settings or {})}
    hyper = {**DEFAULT_HYPER, **(hyper or {})}
    docs = [example_features(ex, settings) for ex in examples]
    y = np.array([ex.label for ex in examples], dtype=np.int64)
    lexicon = base_lexicon() if settings.get("embeddings", True) else []
    temperature = 1.0
    cv_accuracy = cv_ece = None
    cv_confusion = None
    if cv:
        folds = int(hyper["folds"])
        fold = np.array([_fold_of(ex.key, folds) for ex in examples])
        oof = np.zeros((len(docs), len(LABELS)))
        for k in range(folds):
            train_idx = np.flatnonzero(fold != k)
            test_idx = np.flatnonzero(fold == k)
            part = fit_all([docs[i] for i in train_idx], y[train_idx], settings, hyper, lexicon)
            oof[test_idx] = part.logits([docs[i] for i in test_idx], settings)
        temperature = fit_temperature(oof, y)
        predicted = oof.argmax(axis=1)
        cv_accuracy = float((predicted == y).mean())
        cv_confusion = [[int(((y == i) & (predicted == j)).sum()) for j in range(len(LABELS))]
                        for i in range(len(LABELS))]
        cv_ece = _ece(_softmax(oof / temperature), y)
    fitted = fit_all(docs, y, settings, hyper, lexicon)
    per_label = {label: int((y == i).sum()) for i, label in enumerate(LABELS)}
    info = {**(meta or {}), "examples": len(examples), "per_label": per_label}
    if cv_accuracy is not None:
        info["cv_accuracy"] = round(cv_accuracy, 4)
    model = _model_dict(fitted, settings, hyper, temperature, info)
    # Training accuracy, through the inference code (the stored, rounded weights).
    clf = Classifier(model, "<training>")
    right = sum(clf.score(*example_texts(ex, settings), ex.endpoint, explain=0).label
                == LABELS[ex.label] for ex in examples)
    report = Report(
        examples=len(examples), per_label=per_label, train_accuracy=right / len(examples),
        cv_accuracy=cv_accuracy, cv_confusion=cv_confusion, temperature=temperature,
        cv_ece=cv_ece,
        features={name: len(t) for name, t in model["weights"].items()},
        seconds=time.perf_counter() - start)
    model["meta"]["train_accuracy"] = round(report.train_accuracy, 4)
    return model, report


def train_files(paths: Sequence[str | Path], out: str | Path, cv: bool = True) -> Report:
    examples, digests = read_examples(paths)
    model, report = train(examples, meta={"data": digests}, cv=cv)
    Path(out).write_bytes(dump_model(model))
    return report
