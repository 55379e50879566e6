"""Every failure a client can see, mapped to an OpenAI error body and an HTTP status in one table.

Errors are raised as `RoundhouseError` subclasses anywhere (ingress or model replica; they pickle,
so they survive the Ray hop) and turned into a response only by `error_payload`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

logger = logging.getLogger("ray.serve.roundhouse")  # Serve's replica log files


class RoundhouseError(Exception):
    status: int = 500
    type: str = "internal_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments do not survive the default Exception pickling across Ray.
        return (_rebuild, (type(self), self.message, self.param, self.code, self.retry_after_s))


def _rebuild(
    cls: type[RoundhouseError],
    message: str,
    param: str | None,
    code: str | None,
    retry_after_s: float | None,
) -> RoundhouseError:
    return cls(message, param=param, code=code, retry_after_s=retry_after_s)


class BadRequest(RoundhouseError):
    status, type, code = 400, "invalid_request_error", "bad_request"


class Unauthorized(RoundhouseError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class Forbidden(RoundhouseError):
    status, type, code = 403, "permission_error", "model_not_allowed"


class NotFound(RoundhouseError):
    status, type, code = 404, "invalid_request_error", "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class EndpointNotSupported(NotFound):
    """The model's engine does not serve this endpoint (embeddings on a chat model, ...)."""

    code = "endpoint_not_supported"


class MethodNotAllowed(RoundhouseError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class PayloadTooLarge(RoundhouseError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class UnsupportedMediaType(RoundhouseError):
    status, type, code = 415, "invalid_request_error", "unsupported_media_type"


class RateLimited(RoundhouseError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class ModelUnavailable(RoundhouseError):
    status, type, code = 503, "service_unavailable", "model_unavailable"


class ModelDraining(ModelUnavailable):
    """The replica is being evicted and takes no new requests; the ingress routes the request
    again through the controller (clients see it only if that keeps happening)."""

    code = "model_draining"


class GenerationTimeout(RoundhouseError):
    status, type, code = 504, "timeout_error", "generation_timeout"


def unwrap(exc: BaseException) -> BaseException:
    """Ray wraps replica exceptions (RayTaskError and friends); the cause is what we classify.

    The wrapper may itself subclass the cause's type without carrying its attributes, so we
    always follow `.cause` to the original exception.
    """
    for _ in range(5):
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException) or cause is exc:
            break
        exc = cause
    return exc


def is_replica_lost(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"ActorDiedError", "ActorUnavailableError", "RayActorError",
                         "WorkerCrashedError", "DeploymentUnavailableError"})


def error_payload(exc: BaseException, request_id: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, extra headers) for any exception; never leaks a stack trace."""
    exc = unwrap(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, RoundhouseError):
        status, etype, code, message, param = exc.status, exc.type, exc.code, exc.message, exc.param
        if exc.retry_after_s is not None:
            headers["retry-after"] = str(max(1, round(exc.retry_after_s)))
    elif is_replica_lost(exc):
        status, etype, code, param = 503, "service_unavailable", "model_unavailable", None
        message = "the model replica serving this request stopped; retry the request"
        headers["retry-after"] = "5"
        logger.warning("request %s: model replica lost: %s", request_id, type(exc).__name__)
    else:
        status, etype, code, param = 500, "internal_error", "internal_error", None
        message = f"internal error; quote request id {request_id} when reporting it"
        logger.error("request %s: unhandled %s", request_id, type(exc).__name__, exc_info=exc)
    body = {"error": {"message": message, "type": etype, "param": param, "code": code,
                      "request_id": request_id}}
    return status, body, headers


# The engine's OpenAI app (vLLM's server) answers errors with its own bodies: integer `code`,
# `type` "BadRequestError", FastAPI's {"detail": ...} for unknown routes. They are mapped into
# the table above here, so clients get one error shape.
_ENGINE_STATUS: dict[int, type[RoundhouseError]] = {
    400: BadRequest, 404: EndpointNotSupported, 405: MethodNotAllowed, 413: PayloadTooLarge,
    422: BadRequest, 429: RateLimited, 501: BadRequest, 503: ModelUnavailable,
    504: GenerationTimeout,
}
CONTEXT_LENGTH_MARKER = "maximum context length"


def engine_error(status: int | None, body: bytes, model: str) -> RoundhouseError:
    """An engine app's error response (or, with `status` None, an error event of its stream,
    whose status is the body's `code`) as one of ours. 5xx messages are not passed on (they may
    say more about the server than a client should see); the log keeps their type."""
    message, param, kind = "", None, ""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed)
        if isinstance(error, dict):
            message = str(error.get("message") or error.get("detail") or "")
            param = error.get("param") if isinstance(error.get("param"), str) else None
            kind = str(error.get("type") or "")
            if status is None and isinstance(error.get("code"), int):
                status = error["code"]
    if status is None:
        status = 500
    cls = _ENGINE_STATUS.get(status)
    if cls is None:  # 500 and other server errors
        logger.warning("model %s: the engine answered %d (%s)", model, status, kind or "no type")
        return RoundhouseError(f"model {model} failed to serve the request")
    if cls is EndpointNotSupported:
        return EndpointNotSupported(f"model {model} does not serve this endpoint "
                                    f"({message or 'not found'})")
    if cls is ModelUnavailable:
        return ModelUnavailable(f"model {model} cannot serve right now; retry shortly",
                                retry_after_s=5)
    code = None
    if cls is BadRequest:
        if CONTEXT_LENGTH_MARKER in message:
            code = "context_length_exceeded"
        elif status == 501:
            code = "not_supported"
    return cls(message or f"model {model} refused the request", param=param, code=code)


def stream_error_event(path: str, exc: BaseException, request_id: str,
                       done: bool = True) -> bytes:
    """An error reported inside a stream whose headers are already sent, as vLLM and OpenAI
    report it: a `data: {"error": ...}` event then `[DONE]`; on the Responses API, an `error`
    event."""
    _, body, _ = error_payload(exc, request_id)
    if path == "/v1/responses":
        error = body["error"]
        event = {"type": "error", "code": error["code"], "message": error["message"],
                 "param": error["param"], "sequence_number": 0}
        return f"event: error\ndata: {json.dumps(event)}\n\n".encode()
    text = f"data: {json.dumps(body)}\n\n"
    if done:
        text += "data: [DONE]\n\n"
    return text.encode()
