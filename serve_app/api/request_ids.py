"""One request id per request, the same in the `x-request-id` header, the request's log line and the
utterance memory: Serve's own.

Serve's HTTP proxy gives every request an id (the client's `x-request-id` when it sent one, else a UUID), puts
it in the request's headers on its way to the ingress, and appends it to the response as `X-Request-ID`,
whatever the app answers. So the app adopts that id instead of making its own: a response then carries
exactly one `x-request-id`, under the launcher and under a bare `serve run serve_config.yaml` alike, and a
client can pass the header's value back in `previous_request_ids` as it received it. Where no proxy stands in
front (Serve's local testing mode), this middleware does the proxy's part: it makes an id and answers with it.

A client may choose its own id (Serve keeps it), so the id is hostile input: it must be a short token
(`invalid_request_id` otherwise), and the utterance memory never lets a later request overwrite what an
earlier one said under the same id (text/utterances.py).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.api.errors import to_error_response
from serve_app.core.errors import APIError, InvalidRequestError

HEADER = "x-request-id"
VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def new_request_id() -> str:
    """An id in the form Serve's proxy makes (a UUID), for requests that no proxy has given one."""
    return str(uuid.uuid4())


def request_id_of(scope: Scope) -> str:
    """The request's id, as `RequestIds` left it in the scope's state ("-" outside it)."""
    return scope.get("state", {}).get("request_id", "-")


class RequestIds:
    """ASGI middleware, outermost: the request's id into `scope["state"]["request_id"]`; the response's
    `x-request-id` header only where no proxy adds it. `respond(path, error)` gives another dialect's error
    response for a path (None: OpenAI's)."""

    def __init__(self, app: ASGIApp, respond: Callable[[str, APIError], object] = lambda path, error: None):
        self.app = app
        self.respond = respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get(HEADER)
        state = scope.setdefault("state", {})
        if given is None:  # no proxy in front: this app answers with the id it made
            state["request_id"] = request_id = new_request_id()
            send = _with_header(send, request_id)
        elif VALID_ID.fullmatch(given):
            state["request_id"] = given
        else:
            state["request_id"] = "-"
            error = InvalidRequestError(
                "The x-request-id header must be 1 to 128 letters, digits or '._:-'.",
                param="x-request-id",
                code="invalid_request_id",
            )
            path = scope.get("path", "")
            response = self.respond(path, error) or to_error_response(error)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _with_header(send: Send, request_id: str) -> Send:
    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            MutableHeaders(scope=message).append(HEADER, request_id)
        await send(message)

    return send_with_id
