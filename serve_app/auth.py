"""API keys: `Authorization: Bearer <key>` checked against sha256 hashes from the config.

Keys are never stored, logged or compared in clear: the ingress hashes what the client sends and
compares the digest with every configured hash with `hmac.compare_digest`, without stopping at a
match, so the time taken does not depend on which key (if any) matched. `roundhouse make-key`
makes a key and prints it once, with the entry to put in the config.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from serve_app.config import ApiKey, AuthConfig, ConfigError
from serve_app.errors import Forbidden, Unauthorized
from serve_app.policy.ratelimit import Limits

KEY_PREFIX = "rh-"
_KEYS = TypeAdapter(list[ApiKey])


def make_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: a configured key, or everyone when auth is off."""

    name: str
    admin: bool
    models: frozenset[str] | None  # model names (aliases resolved); None: every model
    limits: Limits

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


ANONYMOUS = Principal("anonymous", admin=True, models=None, limits=Limits())


def _parse_keys(document: Any, source: str) -> list[ApiKey]:
    if isinstance(document, dict) and "keys" in document:
        document = document["keys"]
    if document is None:
        return []
    try:
        return _KEYS.validate_python(document)
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                            for e in exc.errors(include_url=False, include_input=False))
        raise ConfigError(f"auth: {source}: invalid keys: {details}") from None


def load_keys(auth: AuthConfig, environ: Mapping[str, str] = os.environ) -> list[ApiKey]:
    """Every configured key: inline, from `keys_file`, from `keys_env`. A named file or variable
    that is missing is an error (auth must not silently fall open)."""
    keys = list(auth.keys)
    if auth.keys_file is not None:
        path = Path(auth.keys_file).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"auth.keys_file: cannot read {path}: {exc.strerror}") from None
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"auth.keys_file: {path} is not YAML or JSON") from None
        keys += _parse_keys(document, f"keys_file {path}")
    if auth.keys_env is not None:
        value = environ.get(auth.keys_env)
        if value is None:
            raise ConfigError(f"auth.keys_env: the environment variable {auth.keys_env} is "
                              "not set")
        try:
            document = json.loads(value)
        except ValueError:
            raise ConfigError(f"auth.keys_env: {auth.keys_env} does not hold JSON") from None
        keys += _parse_keys(document, f"keys_env {auth.keys_env}")
    names = [k.name for k in keys]
    hashes = [k.sha256 for k in keys]
    if len(set(names)) != len(names) or len(set(hashes)) != len(hashes):
        raise ConfigError("auth: key names and hashes must be unique across all sources")
    return keys


class KeyTable:
    def __init__(self, enabled: bool, keys: list[ApiKey], names: Mapping[str, str]) -> None:
        """`names` maps every model name and alias to its model name."""
        self.enabled = enabled
        self._entries = [
            (k.sha256.encode(), Principal(
                k.name, k.admin,
                None if "*" in k.models else frozenset(names[m] for m in k.models),
                Limits(k.requests_per_minute, k.tokens_per_minute)))
            for k in keys]

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def names(self) -> set[str]:
        return {p.name for _, p in self._entries}

    def authenticate(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        if not authorization:
            raise Unauthorized("missing API key: send it as 'Authorization: Bearer <key>'",
                               code="missing_api_key")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <key>'")
        digest = hash_key(key.strip()).encode()
        found: Principal | None = None
        for stored, principal in self._entries:  # no early exit: constant time in the match
            if hmac.compare_digest(stored, digest):
                found = principal
        if found is None:
            raise Unauthorized("incorrect API key")
        return found

    @staticmethod
    def require_admin(principal: Principal) -> None:
        if not principal.admin:
            raise Forbidden("this endpoint needs an API key with the admin flag",
                            code="admin_required")
