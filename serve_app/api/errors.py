"""The one mapping from an exception to an HTTP error response, per dialect, and the handlers that use it.

OpenAI's body is `{"error": {"message", "type", "param", "code"}}`; ElevenLabs' is
`{"detail": {"status", "message"}}`. Both come from the same `APIError` (core/errors.py), with the same
status and `Retry-After`: `create_error_response` is the only place either body is built, and
`install_error_handlers` the only place FastAPI's own failures (validation, routing, unreadable bodies,
bugs) are turned into them.
"""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.core.errors import (
    APIError,
    InvalidRequestError,
    PayloadTooLargeError,
    RequestTimeoutError,
    as_api_error,
    error_body,
    retry_after,
)

Dialect = Literal["openai", "elevenlabs"]


def create_error_response(exc: BaseException, dialect: Dialect = "openai") -> JSONResponse:
    """Any exception as the dialect's error body, with the status (and Retry-After) its APIError says."""
    error = as_api_error(exc)
    wait = retry_after(error)
    headers = {"Retry-After": wait} if wait else None
    if dialect == "elevenlabs":
        body = {"detail": {"status": error.code or error.error_type, "message": error.message}}
    else:
        body = error.body()
    return JSONResponse(body, status_code=error.status_code, headers=headers)


def to_error_response(exc: BaseException) -> JSONResponse:
    """OpenAI's error body (the default dialect)."""
    return create_error_response(exc, "openai")


def body_error(status_code: int, detail: str) -> APIError | None:
    """The error behind an HTTPException that a body guard raised inside FastAPI's body parsing (limits.py's
    BodyTooLarge, guard.py's BodyTimeout). None for any other status."""
    if status_code == 413:
        return PayloadTooLargeError(detail)
    if status_code == 408:
        return RequestTimeoutError(detail)
    return None


def validation_error(exc: RequestValidationError) -> InvalidRequestError:
    """Pydantic's first complaint about the body, as OpenAI's invalid_request_error."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return InvalidRequestError("We could not parse the JSON body of your request.", code="invalid_json")
    if kind == "model_attributes_type" or not loc:
        return InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    # loc[0] is the field; deeper parts (voice's union branches) do not matter to the client.
    param = loc[0]
    if kind == "missing":
        return InvalidRequestError(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    code = "invalid_type" if kind.endswith("_type") else "invalid_value"
    return InvalidRequestError(f"Invalid value for '{param}': {err.get('msg')}.", param=param, code=code)


def install_error_handlers(app: FastAPI, dialect: Dialect, on_bad_request=None) -> None:
    """Every error of `app` leaves in the dialect's shape: our typed errors, Ray's replica deaths, body
    guards, routing (404/405), unreadable bodies and anything unexpected. OpenAI's validation errors are
    400s with a `param`; ElevenLabs keeps FastAPI's 422 (what ElevenLabs itself answers).
    `on_bad_request(request)` is called for each 400 that never reached a route (the request log counts them)."""

    def respond(exc: BaseException) -> JSONResponse:
        return create_error_response(exc, dialect)

    if dialect == "openai":

        @app.exception_handler(RequestValidationError)
        async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
            if on_bad_request:
                on_bad_request(request)
            return respond(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if (error := body_error(exc.status_code, str(exc.detail))) is not None:  # 413, 408
            return respond(error)
        if dialect == "elevenlabs":
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        if exc.status_code == 400:  # FastAPI could not read the body at all (e.g. it is not UTF-8)
            if on_bad_request:
                on_bad_request(request)
            return respond(
                InvalidRequestError(
                    "We could not parse the JSON body of your request: it must be UTF-8 encoded JSON.",
                    code="invalid_json",
                )
            )
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind, None, None), status_code=exc.status_code)

    # Expected failures (our typed errors, Ray's replica deaths; Ray's task errors also subclass the error
    # they carry) are answered by the first handler. The catch-all also answers, but Starlette then re-raises
    # for the server to log, which Serve does with a traceback: right for bugs, noise for a bad voice name.
    @app.exception_handler(APIError)
    @app.exception_handler(RayActorError)
    async def _expected_error(request: Request, exc: Exception) -> JSONResponse:
        return respond(exc)

    @app.exception_handler(Exception)
    async def _any_error(request: Request, exc: Exception) -> JSONResponse:
        return respond(exc)
