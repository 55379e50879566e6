from __future__ import annotations

import pickle

import pytest

from serve_app import errors


@pytest.mark.parametrize("cls,status", [
    (errors.BadRequest, 400), (errors.Unauthorized, 401), (errors.Forbidden, 403),
    (errors.ModelNotFound, 404), (errors.PayloadTooLarge, 413), (errors.RateLimited, 429),
    (errors.Unauthorized, 401), (errors.Forbidden, 403), (errors.UnsupportedMediaType, 415),
    (errors.ModelUnavailable, 503), (errors.GenerationTimeout, 504),
])
def test_table(cls: type[errors.RoundhouseError], status: int) -> None:
    code, body, _ = errors.error_payload(cls("why", param="p"), "rid")
    assert code == status
    assert body == {"error": {"message": "why", "type": cls.type, "param": "p",
                              "code": cls.code, "request_id": "rid"}}


def test_retry_after_header() -> None:
    _, _, headers = errors.error_payload(errors.RateLimited("slow down", retry_after_s=2.4), "r")
    assert headers == {"retry-after": "2"}


def test_errors_survive_pickling_with_their_fields() -> None:
    exc = errors.BadRequest("too long", param="messages", code="context_length_exceeded",
                            retry_after_s=None)
    again = pickle.loads(pickle.dumps(exc))
    assert (again.message, again.param, again.code) == ("too long", "messages",
                                                         "context_length_exceeded")


def test_wrapped_cause_is_classified() -> None:
    class Wrapper(Exception):
        def __init__(self, cause: BaseException) -> None:
            super().__init__("wrapped")
            self.cause = cause

    status, body, _ = errors.error_payload(Wrapper(errors.ModelNotFound("gone")), "r")
    assert status == 404 and body["error"]["message"] == "gone"


def test_unexpected_errors_are_sanitized() -> None:
    status, body, _ = errors.error_payload(KeyError("secret prompt text"), "req-42")
    assert status == 500
    assert "secret" not in body["error"]["message"]
    assert "req-42" in body["error"]["message"]


def test_lost_replica_is_503() -> None:
    class ActorDiedError(Exception):
        pass

    status, body, headers = errors.error_payload(ActorDiedError("x"), "r")
    assert status == 503 and "retry-after" in headers
