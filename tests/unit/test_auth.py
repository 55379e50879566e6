"""serve_app/auth.py: keys from every source, Bearer parsing, permissions; the make-key CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve_app.auth import ANONYMOUS, KeyTable, hash_key, load_keys, make_key
from serve_app.cli import main
from serve_app.config import ApiKey, AppConfig, AuthConfig, ConfigError
from serve_app.errors import Forbidden, Unauthorized

NAMES = {"chat": "chat", "small": "chat", "code": "code"}


def entry(name: str, key: str, **extra: object) -> dict[str, object]:
    return {"name": name, "sha256": hash_key(key), **extra}


def test_keys_from_inline_file_and_environment(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(json.dumps({"keys": [entry("file", "k2", admin=True)]}))
    auth = AuthConfig(keys=[ApiKey.model_validate(entry("inline", "k1"))],
                      keys_file=str(keys_file), keys_env="RH_KEYS")
    keys = load_keys(auth, {"RH_KEYS": json.dumps([entry("env", "k3", models=["code"])])})
    assert [k.name for k in keys] == ["inline", "file", "env"]
    table = KeyTable(auth.enabled, keys, NAMES)
    assert table.authenticate("Bearer k2").admin
    env = table.authenticate("bearer  k3 ")
    assert env.name == "env" and env.may_use("code") and not env.may_use("chat")
    assert table.authenticate("Bearer k1").may_use("chat")


@pytest.mark.parametrize("environ, message", [
    ({}, "RH_KEYS is not set"),
    ({"RH_KEYS": "not json"}, "does not hold JSON"),
    ({"RH_KEYS": '[{"name": "x", "sha256": "short"}]'}, "invalid keys"),
])
def test_a_bad_key_source_is_an_error_not_an_open_door(environ: dict[str, str],
                                                       message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_keys(AuthConfig(keys_env="RH_KEYS"), environ)


def test_missing_file_and_duplicates_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_keys(AuthConfig(keys_file=str(tmp_path / "nope.yaml")))
    dup = [entry("a", "k"), entry("b", "k")]
    with pytest.raises(ConfigError, match="unique"):
        load_keys(AuthConfig(keys_env="K"), {"K": json.dumps(dup)})


@pytest.mark.parametrize("header, code", [
    (None, "missing_api_key"), ("", "missing_api_key"), ("Basic abc", "invalid_api_key"),
    ("Bearer", "invalid_api_key"), ("Bearer wrong", "invalid_api_key"),
])
def test_missing_or_wrong_keys_are_401(header: str | None, code: str) -> None:
    table = KeyTable(True, [ApiKey.model_validate(entry("a", "right"))], NAMES)
    with pytest.raises(Unauthorized) as info:
        table.authenticate(header)
    assert info.value.status == 401 and info.value.code == code
    assert "right" not in info.value.message and hash_key("right") not in info.value.message


def test_auth_off_lets_everyone_in_as_admin() -> None:
    table = KeyTable(False, [], NAMES)
    assert table.authenticate(None) is ANONYMOUS
    KeyTable.require_admin(ANONYMOUS)
    user = KeyTable(True, [ApiKey.model_validate(entry("u", "k"))], NAMES).authenticate(
        "Bearer k")
    with pytest.raises(Forbidden, match="admin"):
        KeyTable.require_admin(user)


def test_aliases_in_a_keys_model_list_resolve_to_the_model() -> None:
    table = KeyTable(True, [ApiKey.model_validate(entry("u", "k", models=["small"]))], NAMES)
    assert table.authenticate("Bearer k").models == frozenset({"chat"})


def test_config_rejects_unknown_models_and_repeated_names() -> None:
    models = [{"name": "chat", "model": "fake"}]
    with pytest.raises(ValueError, match="unknown models nope"):
        AppConfig.model_validate({"models": models, "auth": {"keys": [
            entry("a", "k", models=["nope"])]}})
    with pytest.raises(ValueError, match="used twice"):
        AppConfig.model_validate({"models": models, "auth": {"keys": [
            entry("a", "k"), entry("a", "j")]}})


def test_make_key_prints_a_key_whose_hash_is_the_entry(capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    assert main(["make-key", "--name", "ci", "--admin", "--models", "chat,code",
                 "--rpm", "60"]) == 0
    lines = capsys.readouterr().out.splitlines()
    key = lines[0].rsplit(" ", 1)[1]
    record = json.loads(lines[-1])
    assert key.startswith("rh-") and len(key) > 40 and key != make_key()
    assert record == {"name": "ci", "sha256": hash_key(key), "admin": True,
                      "models": ["chat", "code"], "requests_per_minute": 60}
    assert main(["make-key", "--name", "bad name"]) == 1
