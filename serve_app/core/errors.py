"""Typed errors that survive Ray's handles, each with its HTTP status and OpenAI type and code.

Deployments raise these, or return them as values where the failure is an expected outcome (a bad voice
name is not a replica error); Ray carries them across handles (wrapped in a RayTaskError), and the HTTP
layer maps them to a dialect's body in one place (api/errors.py). Anything that is not an `APIError` becomes
a generic 500 whose details go to the log only. No web framework here: every process imports this.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable
from typing import Any, Optional

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
    """The checkpoint could not be found, downloaded or loaded; the message names the file and the problem.
    It stays so until the server is restarted with that fixed, so it carries no `Retry-After`."""

    default_code = "model_load_failed"


class OutOfMemoryError(ServiceUnavailableError):
    """MLX could not allocate (or the replica passed MLX_MEMORY_LIMIT_MB) while generating."""

    default_code = "out_of_memory"


class GenerationError(APIError):
    """Audio generation or encoding failed part-way."""

    default_code = "generation_failed"


def errors_as_values(method):
    """A deployment method (sync or async) whose expected failures come back as values: an `APIError` raised
    in it is returned, not raised, because Ray Serve logs a "Request failed" traceback for every exception a
    replica raises (a typo's 400 included). The caller awaits the call through `value_of`."""
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def returning(*args, **kwargs):
            try:
                return await method(*args, **kwargs)
            except APIError as exc:
                return exc

        return returning

    @functools.wraps(method)
    def returning_sync(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except APIError as exc:
            return exc

    return returning_sync


async def value_of(call: Awaitable[Any]) -> Any:
    """The result of a call to an `errors_as_values` method; an `APIError` that came back is raised here."""
    result = await call
    if isinstance(result, APIError):
        raise result
    return result


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
    """The `Retry-After` a client should get with this error (429: its own; 503: a few seconds), or None: a
    failed load stays failed, and SDKs that honour the header would only retry it for nothing."""
    if isinstance(error, RateLimitError):
        return str(error.retry_after)
    if isinstance(error, ModelLoadError):
        return None
    return "5" if error.status_code == 503 else None


# Every error code a client can get, with what it means: docs/pages/reference/errors.md is generated from this table,
# and a test reads the source for every code raised and fails when the two differ. (status, meaning)
ERROR_CODES: dict[str, tuple[int, str]] = {
    "empty_input": (400, "`input` is empty or blank."),
    "invalid_input": (400, "Text that cannot be spoken: lone surrogates, or only invisible characters."),
    "string_above_max_length": (400, "`input` (or `transcript`) is longer than allowed (MAX_INPUT_LENGTH)."),
    "invalid_voice": (400, "Unknown voice; the message lists the voices."),
    "invalid_value": (400, "A field's value is out of range or not one of its choices; `param` names it."),
    "invalid_type": (400, "A field has the wrong type; `param` names it."),
    "missing_required_parameter": (400, "A required field is missing; `param` names it."),
    "invalid_json": (400, "The body is not a UTF-8 JSON object."),
    "invalid_request": (400, "ElevenLabs dialect: more than 3 `previous_request_ids` or `next_request_ids`."),
    "invalid_request_id": (400, "The request's `x-request-id` header is not 1-128 letters, digits or `._:-`."),
    "unknown_request_id": (400, "A `previous_request_ids` entry is unknown or expired (UTTERANCE_MAX_AGE_S)."),
    "invalid_multipart": (400, "An upload route got a body that is not multipart/form-data."),
    "invalid_audio": (400, "An upload is not audio this server can read, or is truncated."),
    "empty_file": (400, "An uploaded file is empty."),
    "unsupported_file_type": (400, "An upload's declared type is not audio."),
    "unsupported_value": (400, 'A voice of `type: "prompt"`: CSM clones from audio only.'),
    "audio_too_short": (400, "A voice sample or consent recording is shorter than 1 s."),
    "audio_too_long": (400, "A voice sample or consent recording is longer than CUSTOM_VOICE_MAX_S."),
    "audio_silent": (400, "A voice sample or consent recording is silent."),
    "voice_name_taken": (400, "A custom voice of that name (or a preset or alias) exists already."),
    "voice_limit_reached": (400, "MAX_CUSTOM_VOICES custom voices are stored already."),
    "consent_limit_reached": (400, "MAX_CUSTOM_VOICES consents are stored already."),
    "consent_not_found": (404, "Unknown consent id (400 when a new voice names it)."),
    "invalid_api_key": (401, "API_KEY is set and the request's key is missing or wrong."),
    "host_not_allowed": (403, "The `Host` header is not this machine nor in ALLOWED_HOSTS (DNS rebinding)."),
    "origin_not_allowed": (403, "A state-changing request from a web page whose origin is not in CORS_ORIGINS."),
    "api_key_required": (403, "Creating or deleting voices or consents from another machine while API_KEY is unset."),
    "custom_voices_disabled": (403, "CUSTOM_VOICES is off: no new consents or voices."),
    "voice_not_found": (404, "Unknown custom voice id (ElevenLabs dialect: unknown voice)."),
    "model_not_found": (404, "`GET /v1/models/{id}` for another model than `csm-1b`."),
    "request_timeout": (408, "The body did not arrive in time (BODY_TIMEOUT_S, BODY_MIN_RATE)."),
    "request_too_large": (413, "The body is over MAX_REQUEST_BYTES, or an upload over 10 MiB."),
    "rate_limit_exceeded": (429, "The server is full; `Retry-After` says when to come back (the SDKs retry)."),
    "internal_error": (500, "A bug: the details are in the server's log only."),
    "generation_failed": (
        500,
        "ffmpeg failed while encoding; after audio has started, the stream is aborted (SSE: an `error` event) instead.",
    ),
    "insufficient_storage": (507, "The disk is full: the voice or consent was not stored."),
    "model_not_ready": (503, "The model is still loading (or reloading after an idle unload); `Retry-After`."),
    "model_load_failed": (
        503,
        "The model failed to load: the message names the file and the problem. "
        "It stays so until the server restarts: no `Retry-After`.",
    ),
    "model_restarting": (503, "The model process died and Serve is starting another; `Retry-After`."),
    "model_worker_stopped": (503, "The model's MLX thread stopped; Serve replaces the replica; `Retry-After`."),
    "out_of_memory": (503, "The request pushed MLX past MLX_MEMORY_LIMIT_MB (or MLX could not allocate)."),
    "ffmpeg_unavailable": (503, "ffmpeg is missing or broken (FFMPEG_PATH); the message says what was found."),
    "shutting_down": (503, "The server is stopping; in-flight responses finish; `Retry-After`."),
}
