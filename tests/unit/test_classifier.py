"""policy/classifier.py and routing_train.py: the learned part of routing, its model file and
its training (reproducible, byte for byte)."""

from __future__ import annotations

import gzip
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from serve_app.policy.classifier import (
    DEFAULT_MODEL_PATH,
    LABELS,
    Classifier,
    ModelError,
    char_ngrams,
    dump_model,
    load_model,
    tokenize,
)
from serve_app.routing_train import (
    DataError,
    _model_dict,
    base_lexicon,
    example_features,
    example_texts,
    fit_all,
    read_examples,
    train,
    train_files,
)
from tests.conftest import REPO

EVAL = REPO / "tests" / "data" / "routing_eval.jsonl"
TRAIN = sorted((REPO / "data" / "routing").glob("train-*.jsonl"))


def test_tokenize_words_digits_and_scripts() -> None:
    assert tokenize("Fix my_func() in main.py: it's 404!") == \
        ["fix", "my", "func", "in", "main", "py", "it", "s", "000"]
    assert tokenize("«Ça va?» — l’été 2024…") == ["ça", "va", "l", "été", "0000"]
    assert tokenize("用Python写一个函数") == ["用", "python", "写", "一", "个", "函", "数"]
    assert tokenize("Привет, мир") == ["привет", "мир"]
    assert tokenize("a\ud800b") == ["a\ud800b"]  # a lone surrogate from JSON does not fail
    assert char_ngrams("go", 3, 4) == ["<go", "go>", "<go>"]


def test_the_shipped_model_loads_and_is_small() -> None:
    assert DEFAULT_MODEL_PATH.stat().st_size < 1_000_000
    model = load_model()
    assert load_model(None) is model  # loaded once
    assert model.meta["examples"] >= 3000
    verdict = model.predict([("user", "my container exits with code 137 right after start")])
    assert verdict.label == "code" and 0 < verdict.confidence <= 1
    assert math.isclose(sum(verdict.probabilities), 1.0)


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read the model file"),
    (b"not json at all", "not a model file written by `roundhouse route train`"),
    (gzip.compress(b"[1, 2]"), "not a model file"),
    (json.dumps({"format": "something-else"}).encode(), "not a Roundhouse router model"),
    (json.dumps({"format": "roundhouse-router-classifier/1", "labels": ["chat", "code",
                                                                       "reasoning"]}).encode(),
     "malformed model file"),
])
def test_bad_model_files_are_refused_clearly(tmp_path: Path, content: bytes | None,
                                             message: str) -> None:
    path = tmp_path / "model.json.gz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelError, match=message.replace("(", r"\(")):
        load_model(path)


# --- training ----------------------------------------------------------------------------------


def _small_examples() -> list:
    examples, _ = read_examples([EVAL])
    return examples


def test_inference_computes_what_training_fitted() -> None:
    """The classifier's dictionary sums equal the training design matrix times the weights
    (up to the stored weights' rounding), on requests the model has not seen."""
    examples = _small_examples()
    from serve_app.policy.classifier import DEFAULT_SETTINGS
    settings = dict(DEFAULT_SETTINGS)
    hyper = {"l2": 1e-4, "min_df": 2, "balanced": True, "iterations": 100, "folds": 5,
             "embed_l2": 1e-3, "embed_weight": 0.5}
    seen, unseen = examples[:300], examples[300:]
    docs = [example_features(e, settings) for e in seen]
    y = np.array([e.label for e in seen])
    fitted = fit_all(docs, y, settings, hyper, base_lexicon()[:3000])
    assert fitted.vectors
    model = Classifier(_model_dict(fitted, settings, hyper, 1.0, {}), "<test>")
    expected = fitted.logits([example_features(e, settings) for e in unseen], settings)
    for row, ex in zip(expected, unseen, strict=True):
        got = model.score(*example_texts(ex, settings), ex.endpoint, explain=0)
        want = np.exp(row - row.max())
        want /= want.sum()
        assert np.allclose(got.probabilities, want, atol=0.02), (ex.messages, got, want)


def test_training_is_reproducible_and_order_free(tmp_path: Path) -> None:
    lines = EVAL.read_text().splitlines()
    random.Random(7).shuffle(lines)
    half = len(lines) // 2
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:half]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[half:]) + "\n\n")
    one, two = tmp_path / "one.json.gz", tmp_path / "two.json.gz"
    report = train_files([EVAL], one, cv=False)
    assert report.examples == len(lines) and report.train_accuracy > 0.9
    # The same requests in other files and another order: the same examples, the same model;
    # only the record of the input files differs.
    train_files([tmp_path / "b.jsonl", tmp_path / "a.jsonl"], two, cv=False)
    a, b = (json.loads(gzip.decompress(p.read_bytes())) for p in (one, two))
    assert a["meta"].pop("data") != b["meta"].pop("data")
    assert a == b
    train_files([EVAL], two, cv=False)
    assert one.read_bytes() == two.read_bytes()


def test_bad_training_data_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"label": "chat", "messages": [{"role": "user", "content": "hi"}]}\n'
                    '{"label": "poetry", "messages": [{"role": "user", "content": "a poem"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: label must be one of chat, code"):
        read_examples([path])


def test_temperature_calibrates_out_of_fold_confidence() -> None:
    model, report = train(_small_examples(), cv=True)
    assert report.cv_accuracy is not None and report.cv_ece is not None
    assert report.cv_ece < 0.1
    assert model["temperature"] == report.temperature


@pytest.mark.train
def test_the_shipped_model_is_what_make_router_model_builds(tmp_path: Path) -> None:
    """CI: retraining on data/routing/train-*.jsonl gives the committed file, byte for byte
    (`make router-model` after changing the data or the features)."""
    assert TRAIN, "data/routing/train-*.jsonl is missing"
    out = tmp_path / "router_model.json.gz"
    report = train_files(TRAIN, out)
    print(f"\n{report.text()}")
    assert out.read_bytes() == DEFAULT_MODEL_PATH.read_bytes(), \
        "the shipped model differs from a rebuild: run `make router-model` and commit it"


def test_shipped_model_records_its_training() -> None:
    meta = load_model().meta
    assert set(meta["per_label"]) == set(LABELS)
    assert meta["cv_accuracy"] >= 0.85 and meta["train_accuracy"] >= meta["cv_accuracy"]
    names = [entry.split(":")[0] for entry in meta["data"]]
    assert names == [p.name for p in TRAIN]


def test_dump_model_is_canonical() -> None:
    data = {"b": [1, 2], "a": {"y": 1, "x": "é"}}
    assert dump_model(data) == dump_model(dict(reversed(list(data.items()))))
    assert json.loads(gzip.decompress(dump_model(data))) == data
