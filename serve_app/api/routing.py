"""Routes as data: each dialect lists its routes as `Route`s, and `add_routes` puts them on a FastAPI app
with their documented error statuses (OpenAI's error body for each)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from fastapi import FastAPI

from serve_app.api.protocol import ErrorResponse

_ERROR_DESCRIPTIONS = {
    400: "Invalid request (OpenAI error body).",
    401: "Missing or wrong API key, when API_KEY is set.",
    403: "Turned off on this server (CUSTOM_VOICES=false), or a Host or browser Origin this server does not serve.",
    404: "No such model, voice or voice consent.",
    413: "Request body over MAX_REQUEST_BYTES (uploads: a file over 10 MiB).",
    429: "MAX_QUEUED_REQUESTS are already waiting, or too many uploads at once; see the Retry-After header.",
    500: "Generation failed.",
    503: "Model loading or failed, ffmpeg missing, out of memory, or shutting down; see Retry-After.",
    507: "The server's disk is full: nothing was stored.",
}


def error_responses(*statuses: int) -> dict:
    """OpenAPI `responses` entries for these error statuses, each with OpenAI's error body."""
    return {s: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[s]} for s in statuses}


@dataclass(frozen=True)
class Route:
    path: str
    endpoint: Callable[..., Any]
    method: str = "GET"
    response_model: Any = None
    errors: tuple[int, ...] = ()  # documented error statuses
    response_class: Any = None
    responses: Optional[dict] = None  # further OpenAPI responses (the speech route's audio types)
    openapi_extra: Optional[dict] = None  # a multipart form's schema


def add_routes(app: FastAPI, routes: list[Route]) -> None:
    for route in routes:
        # Only what a route sets: FastAPI's defaults (a response model inferred from the return annotation)
        # stay for the rest.
        given = {
            "response_model": route.response_model,
            "response_class": route.response_class,
            "responses": {**(route.responses or {}), **error_responses(*route.errors)} or None,
            "openapi_extra": route.openapi_extra,
        }
        app.add_api_route(
            route.path,
            route.endpoint,
            methods=[route.method],
            **{key: value for key, value in given.items() if value is not None},
        )
