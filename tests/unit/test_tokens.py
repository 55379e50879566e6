"""serve_app/tokens.py: prompt counting in the ingress."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.config import ModelConfig
from serve_app.local_models import resolve_model_path
from serve_app.tokens import EstimateCounter, HfCounter, WordCounter, counter_for, max_model_len


def test_fake_models_count_words_like_the_fake_engine() -> None:
    model = ModelConfig(name="m", engine="fake", fake={"max_model_len": 99})
    counter = counter_for(model)
    assert isinstance(counter, WordCounter)
    assert counter.chat([{"role": "user", "content": "one two"},
                         {"role": "user", "content": "three"}]) == 3
    assert counter.text("a b c d") == 4
    assert max_model_len(model) == 99


def test_a_tokenizer_that_cannot_load_falls_back_to_an_estimate(tmp_path: Path) -> None:
    model = ModelConfig(name="m", model=str(tmp_path / "missing"),
                        engine_kwargs={"max_model_len": 512})
    counter = counter_for(model)
    assert isinstance(counter, EstimateCounter) and not counter.exact
    assert counter.text("x" * 300) == 100
    assert max_model_len(model) == 512


def test_the_local_model_counts_its_chat_template() -> None:
    path = resolve_model_path("smollm2-135m-instruct")
    if not Path(path).exists():
        pytest.skip("the local model is not prepared (make models)")
    counter = counter_for(ModelConfig(name="m", model=path))
    assert isinstance(counter, HfCounter) and counter.exact
    plain = counter.text("What is the capital of France?")
    chat = counter.chat([{"role": "user", "content": "What is the capital of France?"}])
    assert 5 <= plain < chat  # the template adds the roles and the default system prompt
