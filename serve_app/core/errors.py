"""Typed errors that survive Ray's handles, each with its HTTP status and OpenAI type and code.

Deployments raise these, or return them as values where the failure is an expected outcome (a bad voice
name is not a replica error); Ray carries them across handles (wrapped in a RayTaskError), and the HTTP
layer maps them to a dialect's body in one place (api/errors.py). Anything that is not an `APIError` becomes
a generic 500 whose details go to the log only. No web framework here: every process imports this.
"""

from __future__ import annotations

import logging
from typing import Optional

from serve_app.core.constants import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)


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

    def __init__(self, message: str, *, param: Optional[str] = None, code: Optional[str] = None, retry_after: int = 1):
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
        return ServiceUnavailableError(
            "The model process restarted while serving this request; retry shortly.", code="model_restarting"
        )
    logger.error("unexpected error", exc_info=(type(original), original, original.__traceback__))
    return APIError("The server had an error while processing your request.")


def retry_after(error: APIError) -> Optional[str]:
    """The `Retry-After` a client should get with this error (429: its own; 503: a few seconds), or None."""
    if isinstance(error, RateLimitError):
        return str(error.retry_after)
    return "5" if error.status_code == 503 else None
