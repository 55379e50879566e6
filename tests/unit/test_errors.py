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


def vllm_body(message: str, code: int, param: str | None = None) -> bytes:
    import json

    return json.dumps({"error": {"message": message, "type": "BadRequestError",
                                 "param": param, "code": code}}).encode()


@pytest.mark.parametrize("status,body,cls,code", [
    (400, vllm_body("temperature must be in [0, 2]", 400, "temperature"), errors.BadRequest,
     "bad_request"),
    (400, vllm_body("This model's maximum context length is 2048 tokens. However, ...", 400),
     errors.BadRequest, "context_length_exceeded"),
    (404, b'{"detail": "Not Found"}', errors.EndpointNotSupported, "endpoint_not_supported"),
    (501, vllm_body("The model does not support Responses API", 501), errors.BadRequest,
     "not_supported"),
    (503, vllm_body("engine is sleeping", 503), errors.ModelUnavailable, "model_unavailable"),
    (None, vllm_body("bad tool schema", 400), errors.BadRequest, "bad_request"),
])
def test_engine_errors_are_mapped_into_the_table(status: int | None, body: bytes,
                                                 cls: type[errors.RoundhouseError],
                                                 code: str) -> None:
    error = errors.engine_error(status, body, "chat")
    assert type(error) is cls and error.code == code
    http_status, payload, _ = errors.error_payload(error, "r")
    assert http_status == cls.status and isinstance(payload["error"]["code"], str)


def test_engine_server_errors_are_sanitized() -> None:
    error = errors.engine_error(500, vllm_body("CUDA error at /src/x.cu:12 prompt=secret", 500),
                                "chat")
    status, payload, _ = errors.error_payload(error, "r")
    assert status == 500 and "secret" not in payload["error"]["message"]
    assert errors.engine_error(None, b"not json", "chat").status == 500


def test_stream_error_events() -> None:
    import json

    chat = errors.stream_error_event("/v1/chat/completions", errors.GenerationTimeout("slow"), "r")
    first, done, _ = chat.decode().split("\n\n")
    assert json.loads(first.removeprefix("data: "))["error"]["code"] == "generation_timeout"
    assert done == "data: [DONE]"
    event = errors.stream_error_event("/v1/responses", errors.GenerationTimeout("slow"), "r")
    name, data = event.decode().strip().split("\n")
    assert name == "event: error"
    assert json.loads(data.removeprefix("data: "))["code"] == "generation_timeout"
