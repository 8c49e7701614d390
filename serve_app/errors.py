"""Typed errors and the one place that turns any exception into OpenAI's error body.

Deployments raise these; Ray carries them across handles (wrapped in a RayTaskError), and the ingress maps
them with `to_error_response`. Anything that is not an `APIError` becomes a generic 500 whose details go to
the log only.
"""

from __future__ import annotations

import logging
from typing import Optional

from fastapi.responses import JSONResponse

logger = logging.getLogger("sesame_tts")


class APIError(Exception):
    """An error with a known HTTP status and OpenAI error type/code."""

    status_code = 500
    error_type = "server_error"
    default_code: Optional[str] = "internal_error"

    def __init__(self, message: str, *, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def __reduce__(self):
        # Keyword arguments (and any extra attributes, such as retry_after) survive pickling across handles.
        return (_rebuild, (type(self), self.message, self.param, self.code), self.__dict__)

    def body(self) -> dict:
        return error_body(self.message, self.error_type, self.param, self.code)


def _rebuild(cls, message, param, code):
    return cls(message, param=param, code=code)


class InvalidRequestError(APIError):
    status_code = 400
    error_type = "invalid_request_error"
    default_code = "invalid_value"


class AuthenticationError(APIError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(APIError):
    """The server is configured not to allow this (a feature turned off)."""

    status_code = 403
    error_type = "invalid_request_error"
    default_code = "permission_denied"


class NotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class RequestTimeoutError(APIError):
    """The request's body did not arrive within its deadline (a slow or stalled client)."""

    status_code = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class InsufficientStorageError(APIError):
    """The disk is full: nothing was stored."""

    status_code = 507
    error_type = "server_error"
    default_code = "insufficient_storage"


class PayloadTooLargeError(APIError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class RateLimitError(APIError):
    """Too many requests are already waiting for the model; `retry_after` says when to come back."""

    status_code = 429
    error_type = "requests"  # what OpenAI sends for request-rate limits
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 retry_after: int = 1):
        super().__init__(message, param=param, code=code)
        self.retry_after = retry_after



class ServiceUnavailableError(APIError):
    """The server cannot serve right now (model loading or broken, ffmpeg missing)."""

    status_code = 503
    error_type = "server_error"
    default_code = "service_unavailable"


class ModelNotReadyError(ServiceUnavailableError):
    default_code = "model_not_ready"


class ModelLoadError(ModelNotReadyError):
    """The checkpoint could not be found, downloaded or loaded; the message names the file and the problem."""

    default_code = "model_load_failed"


class OutOfMemoryError(ServiceUnavailableError):
    """MLX could not allocate (or the replica passed MLX_MEMORY_LIMIT_MB) while generating."""

    default_code = "out_of_memory"


class GenerationError(APIError):
    """Audio generation or encoding failed part-way."""

    default_code = "generation_failed"


def body_error(status_code: int, detail: str) -> Optional[APIError]:
    """The error behind an HTTPException that a body guard raised inside FastAPI's body parsing (limits.py's
    BodyTooLarge, guard.py's BodyTimeout): both dialects' handlers map it here. None for any other status."""
    if status_code == 413:
        return PayloadTooLargeError(detail)
    if status_code == 408:
        return RequestTimeoutError(detail)
    return None


def error_body(message: str, error_type: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def unwrap(exc: BaseException) -> BaseException:
    """The original exception behind Ray's wrappers (RayTaskError keeps it as `.cause`)."""
    seen = 0
    while getattr(exc, "cause", None) is not None and seen < 5:
        exc = exc.cause
        seen += 1
    return exc


def _is_replica_death(exc: BaseException) -> bool:
    """A replica process died or became unreachable (Serve starts a new one)."""
    from ray.exceptions import RayActorError  # ActorDiedError and ActorUnavailableError too

    return isinstance(exc, RayActorError)


def status_of(exc: BaseException) -> int:
    """The HTTP status an exception maps to (no logging)."""
    original = unwrap(exc)
    if isinstance(original, APIError):
        return original.status_code
    return 503 if _is_replica_death(original) else 500


def as_api_error(exc: BaseException) -> APIError:
    """Any exception as an APIError; unknown ones are logged with their traceback and hidden."""
    original = unwrap(exc)
    if isinstance(original, APIError):
        return original
    if _is_replica_death(original):
        logger.warning("a replica died while serving a request: %s", type(original).__name__)
        return ServiceUnavailableError("The model process restarted while serving this request; retry shortly.",
                                       code="model_restarting")
    logger.error("unexpected error", exc_info=(type(original), original, original.__traceback__))
    return APIError("The server had an error while processing your request.")


def to_error_response(exc: BaseException) -> JSONResponse:
    """The one mapping from an exception to an HTTP response with OpenAI's error body."""
    error = as_api_error(exc)
    headers = None
    if isinstance(error, RateLimitError):
        headers = {"Retry-After": str(error.retry_after)}
    elif error.status_code == 503:
        headers = {"Retry-After": "5"}
    return JSONResponse(error.body(), status_code=error.status_code, headers=headers)
