"""RequestScreen: what every HTTP request must pass on its headers alone, before a byte of its body is read.

The server listens on the LAN by default, so a request is hostile until checked, and checks that need the
body come too late: a FastAPI dependency runs after the JSON body has been read, and a client that declares
100 kB and sends a byte every two seconds holds a slot of the ingress for as long as it likes. This ASGI
middleware runs first and decides, in this order:

1. **Host**: a browser page on another site can reach this server through DNS rebinding (its own name
   pointed at 127.0.0.1 or the Mac's address). Such a request carries that site's name in `Host`, so only
   this machine's names and addresses (loopback, its host names, its interfaces' addresses, HOST) and
   ALLOWED_HOSTS are served; anything else is 403 `host_not_allowed`.
2. **Origin**: a web page may POST to any address (a form or a multipart upload is a CORS "simple
   request", sent without asking). A state-changing request whose `Origin` is neither this server itself nor
   in CORS_ORIGINS is 403 `origin_not_allowed`. Clients that send no Origin (SDKs, curl, OpenClaw, Open
   WebUI's backend) are not affected.
3. **API key**: with API_KEY set, the routes that need it (`ROUTE_ACCESS` in the ingress decides which) get
   401 on the headers alone. Without API_KEY, the routes that write what the server keeps (voices and
   consents: "write") are this machine's alone: a LAN client gets 403 `api_key_required`, since anyone on
   the network could otherwise store or delete a person's voice. What the request may see is left in
   `scope["state"]` for the handlers: whether it carried the key (`api_key_ok`), and whether it may see
   details (`trusted`: the key, or loopback).
4. **WebSockets** (ElevenLabs' sockets): Host and Origin as above, any Origin but the server's own and
   CORS_ORIGINS refused at the handshake (a page may open a socket to any address); the key may also come
   in the socket's first message, so that check is the socket's own (api/sockets.py).
5. **Body deadline**: the body's bytes are due within BODY_TIMEOUT_S of the start plus what has arrived at
   BODY_MIN_RATE bytes per second; a client that falls behind gets 408 `request_timeout`, and its slot is
   free again.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import socket
import time
from collections.abc import Callable
from typing import Optional

import psutil
from fastapi import HTTPException
from starlette.datastructures import Headers

from serve_app.api.errors import to_error_response
from serve_app.api.request_ids import request_id_of
from serve_app.core.errors import APIError, AuthenticationError, PermissionDeniedError
from serve_app.core.settings import Settings

UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
NAMES_REFRESH_S = 30.0  # an unknown Host re-reads the machine's names and addresses at most this often


class BodyTimeout(HTTPException):
    """Raised from the timed `receive`; FastAPI passes HTTPExceptions through body parsing untouched."""

    def __init__(self, seconds: float):
        super().__init__(status_code=408, detail=timeout_message(seconds))


def timeout_message(seconds: float) -> str:
    return f"The request body did not arrive in time (too slow after {seconds:.0f} s); send it at once."


def host_of(header: str) -> str:
    """The host part of a Host header or an origin's authority: no port, no brackets, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    if header.count(":") == 1:
        return header.split(":", 1)[0]
    return header.rstrip(".")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host in ("localhost", "localhost.localdomain") or host.endswith(".localhost")


class HostNames:
    """The names and addresses this machine answers to, plus ALLOWED_HOSTS ("*": any)."""

    def __init__(self, settings: Settings):
        self.any = "*" in settings.allowed_hosts
        self.extra = {host_of(h) for h in settings.allowed_hosts if h != "*"}
        self.bind = settings.host
        self.known: set[str] = set()
        self.read_at = float("-inf")
        self._read()

    def _read(self) -> None:
        # HOST if it names this machine; never a wildcard: "0.0.0.0" in a browser's address bar reaches
        # this machine's servers, and pages have used exactly that to reach local services.
        names = {socket.gethostname(), socket.gethostname().split(".")[0] + ".local"}
        if self.bind not in ("0.0.0.0", "::"):
            names.add(self.bind)
        try:
            names.add(socket.getfqdn())
        except OSError:
            pass
        for addresses in psutil.net_if_addrs().values():
            for address in addresses:
                if address.family in (socket.AF_INET, socket.AF_INET6):
                    names.add(address.address.split("%", 1)[0])
        self.known = {host_of(n) for n in names if n} | self.extra
        self.read_at = time.monotonic()

    def allows(self, header: Optional[str]) -> bool:
        if header is None or self.any:  # no Host at all: HTTP/1.0, never a browser
            return True
        host = host_of(header)
        if _is_loopback(host) or host in self.known:
            return True
        if time.monotonic() - self.read_at > NAMES_REFRESH_S:  # DHCP may have given the Mac a new address
            self._read()
            return host in self.known
        return False


class RequestScreen:
    """ASGI middleware. `access(method, path)` says what a route needs: None (open), "key" (the API key,
    when API_KEY is set) or "trusted" (the key or a loopback client: details and docs); `respond(path,
    error)` gives another dialect's error response for a path (None: OpenAI's)."""

    def __init__(
        self,
        app,
        settings: Settings,
        access: Callable[[str, str], Optional[str]],
        respond: Callable[[str, APIError], object] = lambda path, error: None,
        alternative_key_header: Callable[[str], Optional[str]] = lambda path: None,
        on_unauthorized: Callable[[str, str, str], None] = lambda method, path, request_id: None,
    ):
        self.app = app
        self.settings = settings
        self.hosts = HostNames(settings)
        self.access = access
        self.respond = respond
        self.alternative_key_header = alternative_key_header  # ElevenLabs' xi-api-key on its paths
        self.on_unauthorized = on_unauthorized
        self.origins = set(settings.cors_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            return await self._socket(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        path, method = scope.get("path", ""), scope.get("method", "GET")
        key_ok, key_given = self._key(headers, path)
        client = (scope.get("client") or ("", 0))[0]
        state = scope.setdefault("state", {})
        state["api_key_ok"] = key_ok
        loopback = _is_loopback(client)
        state["trusted"] = trusted = loopback or key_given
        error = self._refusal(headers, method, path, key_ok, trusted, loopback)
        if error is not None:
            if isinstance(error, AuthenticationError):
                self.on_unauthorized(method, path, request_id_of(scope))
            response = self.respond(path, error) or to_error_response(error)
            return await response(scope, receive, send)
        await self.app(scope, self._timed(receive), send)

    async def _socket(self, scope, receive, send):
        """A WebSocket handshake: Host as for HTTP; any Origin but this server's own and CORS_ORIGINS is refused
        (a browser lets every page open a socket anywhere, with no preflight); the key is left in the state,
        because ElevenLabs' sockets may also carry it in their first message (api/sockets.py checks)."""
        headers = Headers(scope=scope)
        path = scope.get("path", "")
        key_ok, key_given = self._key(headers, path)
        state = scope.setdefault("state", {})
        state["api_key_ok"], state["trusted"] = key_ok, key_given or _is_loopback((scope.get("client") or ("",))[0])
        origin = headers.get("origin")
        if (
            not self.hosts.allows(headers.get("host"))
            or origin is not None
            and not self._origin_allowed(origin, headers)
        ):
            return await send({"type": "websocket.close", "code": 1008})  # before accept: an HTTP 403
        await self.app(scope, receive, send)

    def _key(self, headers: Headers, path: str) -> tuple[bool, bool]:
        """(may use what the key guards: a valid key, or no API_KEY set; carried a valid key)."""
        expected = self.settings.api_key
        if expected is None:
            return True, False
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
        if not given and (name := self.alternative_key_header(path)):
            given = headers.get(name, "")
        valid = bool(given) and hmac.compare_digest(given.encode(), expected.get_secret_value().encode())
        return valid, valid

    def _refusal(
        self, headers: Headers, method: str, path: str, key_ok: bool, trusted: bool, loopback: bool
    ) -> Optional[APIError]:
        if not self.hosts.allows(headers.get("host")):
            return PermissionDeniedError(
                "This server does not answer to that host name. Use its address or a name in ALLOWED_HOSTS.",
                code="host_not_allowed",
            )
        origin = headers.get("origin")
        if method in UNSAFE_METHODS and origin is not None and not self._origin_allowed(origin, headers):
            return PermissionDeniedError(
                "Requests from this web page's origin are not allowed; add it to CORS_ORIGINS to allow it.",
                code="origin_not_allowed",
            )
        needs = self.access(method, path)
        if needs == "write":
            if self.settings.api_key is None and not loopback:
                return PermissionDeniedError(
                    "Creating or deleting voices and consents is allowed from this server's own machine only, "
                    "because API_KEY is not set. Set API_KEY on the server and send it as 'Authorization: Bearer "
                    "<API_KEY>' to do this from another machine.",
                    code="api_key_required",
                )
            needs = "key"
        if needs == "key" and not key_ok or needs == "trusted" and not trusted:
            if (header := self.alternative_key_header(path)) is not None:
                return AuthenticationError(f"Invalid API key: send it in the '{header}' header.")
            return AuthenticationError("Incorrect or missing API key. Send 'Authorization: Bearer <API_KEY>'.")
        return None

    def _origin_allowed(self, origin: str, headers: Headers) -> bool:
        if "*" in self.origins or origin in self.origins:
            return True
        # The server's own pages (the /docs try-out) post with its own origin.
        authority = origin.split("://", 1)[1] if "://" in origin else ""
        return bool(authority) and authority.lower() == headers.get("host", "").lower()

    def _timed(self, receive):
        """`receive` with the body's deadline: the next bytes are due by BODY_TIMEOUT_S after the first read plus
        what has arrived so far at BODY_MIN_RATE, so a client that trickles falls behind within seconds, and
        one that sends at the minimum rate or faster is never cut. Once the body is in, the wait for a
        disconnect has no deadline."""
        started, received, done = None, 0, False
        timeout, rate = self.settings.body_timeout_s, self.settings.body_min_rate

        async def timed_receive():
            nonlocal started, received, done
            if done:
                return await receive()
            # From the first read on: a request that waits its turn (an upload behind others) is not late.
            started = time.monotonic() if started is None else started
            due = started + timeout + received / rate
            try:
                message = await asyncio.wait_for(receive(), max(0.0, due - time.monotonic()))
            except asyncio.TimeoutError:
                raise BodyTimeout(time.monotonic() - started) from None
            received += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                done = True
            return message

        return timed_receive
