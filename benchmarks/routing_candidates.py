"""Which learned classifier the router uses: candidates compared by cross-validated accuracy on
the training data (data/routing/train-*.jsonl, 5 folds by a hash of each request, the same folds
for every candidate), accuracy on the regression set (tests/data/routing_eval.jsonl, trained on
all the training data) and per-decision latency (p50/p99 over the regression set's requests).

Candidates:
- `linear-ngrams`: logistic regression over words, word pairs, character n-grams, symbols and
  context words, scored in pure Python from dictionaries (serve_app/policy/classifier.py with
  settings embeddings and rules off);
- `linear-ngrams+embeddings`: the same plus the mean wordllama static embedding of the words,
  projected on the labels at training, so it is one more dictionary column at run time;
- `shipped`: the same plus the hand-written scores (policy/signals.py) as features: the
  classifier Roundhouse ships (timed with the rule scoring it needs);
- `tfidf-sklearn`: the textbook version: scikit-learn TF-IDF of word 1-2-grams and character
  2-5-grams (of the last user message) + LogisticRegression, scored through scikit-learn;
- `wordllama`: the 256-d static embeddings shipped in the `wordllama` wheel (of the last user
  message and of the context), LogisticRegression on top;
- `rules`: the hand-written scores alone (routing.classifier.enabled: false), for reference.

Needs scikit-learn and wordllama (`pip install scikit-learn wordllama`; not runtime
dependencies). Writes benchmarks/results/routing_candidates.json.

    python benchmarks/routing_candidates.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from serve_app.policy.classifier import LABELS, Classifier, dump_model  # noqa: E402
from serve_app.routing_train import (  # noqa: E402
    DEFAULT_HYPER,
    Example,
    _fold_of,
    read_examples,
    train,
)

RESULTS = REPO / "benchmarks" / "results"
TRAIN = sorted((REPO / "data" / "routing").glob("train-*.jsonl"))
EVAL = REPO / "tests" / "data" / "routing_eval.jsonl"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _timing(fn: Any, items: list[Any], rounds: int = 20) -> dict[str, float]:
    for item in items:
        fn(item)
    times: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(rounds):
        for item in items:
            start = clock()
            fn(item)
            times.append((clock() - start) / 1000)
    return {"p50_us": round(_percentile(times, 0.5), 1), "p99_us": round(_percentile(times, 0.99), 1)}


def _last_and_context(ex: Example) -> tuple[str, str]:
    from serve_app.policy.classifier import DEFAULT_SETTINGS, split_messages
    s = DEFAULT_SETTINGS
    return split_messages(ex.messages, s["last_window"], s["context_window"],
                          s["context_messages"])


def _accuracy(pred: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    recall = {label: round(float((pred[y == i] == i).mean()), 3)
              for i, label in enumerate(LABELS) if (y == i).any()}
    return {"accuracy": round(float((pred == y).mean()), 3), "recall": recall}


def _linear(train_ex: list[Example], eval_ex: list[Example], settings: dict[str, Any]
            ) -> dict[str, Any]:
    model, report = train(train_ex, settings=settings, cv=True)
    clf = Classifier(model, "<candidate>")
    y_eval = np.array([e.label for e in eval_ex])
    pred = np.array([LABELS.index(clf.predict(e.messages, e.endpoint, explain=0).label)
                     for e in eval_ex])
    size = len(dump_model(model))
    return {"cv": {"accuracy": round(report.cv_accuracy or 0, 3),
                   "recall": {label: round(report.cv_confusion[i][i] / max(sum(report.cv_confusion[i]), 1), 3)  # type: ignore[index]
                              for i, label in enumerate(LABELS)}},
            "train_accuracy": round(report.train_accuracy, 3),
            "regression": _accuracy(pred, y_eval),
            "latency": _timing(lambda e: clf.predict(e.messages, e.endpoint), eval_ex),
            "model_file_bytes": size}


def linear_ngrams(train_ex: list[Example], eval_ex: list[Example]) -> dict[str, Any]:
    return _linear(train_ex, eval_ex, {"embeddings": False, "rules": False})


def linear_embeddings(train_ex: list[Example], eval_ex: list[Example]) -> dict[str, Any]:
    return _linear(train_ex, eval_ex, {"rules": False})


def shipped(train_ex: list[Example], eval_ex: list[Example]) -> dict[str, Any]:
    return _linear(train_ex, eval_ex, {})


def _sk_cv(make: Any, x_of: Any, train_ex: list[Example], eval_ex: list[Example]
           ) -> tuple[dict[str, Any], Any]:
    folds = int(DEFAULT_HYPER["folds"])
    y = np.array([e.label for e in train_ex])
    fold = np.array([_fold_of(e.key, folds) for e in train_ex])
    pred = np.zeros(len(y), dtype=np.int64)
    for k in range(folds):
        tr, te = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        model = make()
        model.fit(x_of([train_ex[i] for i in tr]), y[tr])
        pred[te] = model.predict(x_of([train_ex[i] for i in te]))
    model = make()
    model.fit(x_of(train_ex), y)
    train_pred = model.predict(x_of(train_ex))
    y_eval = np.array([e.label for e in eval_ex])
    out = {"cv": _accuracy(pred, y), "train_accuracy": round(float((train_pred == y).mean()), 3),
           "regression": _accuracy(model.predict(x_of(eval_ex)), y_eval)}
    return out, model


def tfidf_sklearn(train_ex: list[Example], eval_ex: list[Example]) -> dict[str, Any]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    def make() -> Any:
        return make_pipeline(
            make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2),
                       TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5),
                                       sublinear_tf=True, min_df=2)),
            LogisticRegression(C=10.0, max_iter=2000, class_weight="balanced"))

    def x_of(exs: list[Example]) -> list[str]:
        return [_last_and_context(e)[0] for e in exs]

    out, model = _sk_cv(make, x_of, train_ex, eval_ex)
    out["latency"] = _timing(lambda e: model.predict_proba([_last_and_context(e)[0]]), eval_ex,
                             rounds=3)
    return out


def wordllama_lr(train_ex: list[Example], eval_ex: list[Example]) -> dict[str, Any]:
    import wordllama
    from sklearn.linear_model import LogisticRegression
    from wordllama import WordLlama

    wl = WordLlama.load(cache_dir=Path(wordllama.__file__).parent, disable_download=True)

    def x_of(exs: list[Example]) -> np.ndarray:
        pairs = [_last_and_context(e) for e in exs]
        last = wl.embed([p[0] or " " for p in pairs])
        context = wl.embed([p[1] or " " for p in pairs]) * np.array(
            [[1.0 if p[1] else 0.0] for p in pairs])
        return np.hstack([last, 0.5 * context])

    def make() -> Any:
        return LogisticRegression(C=1.0, max_iter=3000, class_weight="balanced")

    out, model = _sk_cv(make, x_of, train_ex, eval_ex)
    w, b = model.coef_.T.astype(np.float32), model.intercept_.astype(np.float32)

    def one(e: Example) -> Any:
        last, context = _last_and_context(e)
        v = wl.embed([last or " "])[0]
        z = v @ w[:256] + b
        if context:
            z = z + 0.5 * (wl.embed([context])[0] @ w[256:])
        return z.argmax()

    out["latency"] = _timing(one, eval_ex)
    return out


def rules(train_ex: list[Example], eval_ex: list[Example]) -> dict[str, Any]:
    from serve_app.policy.routing import RouteInput, detect

    def label(e: Example) -> int:
        s = detect(RouteInput(e.endpoint, messages=e.messages))
        return 1 if s.code else 2 if s.reasoning else 0

    y = np.array([e.label for e in train_ex])
    y_eval = np.array([e.label for e in eval_ex])
    return {"train_data": _accuracy(np.array([label(e) for e in train_ex]), y),
            "regression": _accuracy(np.array([label(e) for e in eval_ex]), y_eval),
            "latency": _timing(lambda e: detect(RouteInput(e.endpoint, messages=e.messages)),
                               eval_ex)}


CANDIDATES = {"linear-ngrams": linear_ngrams, "linear-ngrams+embeddings": linear_embeddings,
              "shipped": shipped, "tfidf-sklearn": tfidf_sklearn, "wordllama": wordllama_lr,
              "rules": rules}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(CANDIDATES))
    args = parser.parse_args()
    train_ex, digests = read_examples(TRAIN)
    eval_ex, _ = read_examples([EVAL])
    # The docs share no request with the training data; drop any overlap from the regression
    # side so its figure is on unseen requests.
    keys = {e.key for e in train_ex}
    eval_ex = [e for e in eval_ex if e.key not in keys]
    results: dict[str, Any] = {}
    for name in args.only or list(CANDIDATES):
        start = time.perf_counter()
        results[name] = CANDIDATES[name](train_ex, eval_ex)
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(name, json.dumps(results[name]), flush=True)
    out = {"benchmark": "routing_candidates",
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "train": {"files": digests, "examples": len(train_ex)},
           "regression_examples": len(eval_ex), "candidates": results}
    path = RESULTS / "routing_candidates.json"
    if args.only and path.exists():  # update those candidates in the last full run's file
        previous = json.loads(path.read_text())
        out["candidates"] = {**previous["candidates"], **results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
