"""A raw client for ElevenLabs' WebSockets (websockets' sync client): the protocol's edge cases, message by
message, as the frameworks send them."""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from urllib.parse import urlencode

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

RECEIVE_TIMEOUT_S = 120  # one message; the tiny model on a loaded 2-core machine is slow, never this slow


def socket(server, route: str, voice: str = "conversational", headers=None, **query) -> ClientConnection:
    """`route` is 'stream-input' or 'multi-stream-input'."""
    url = server.base_url.replace("http://", "ws://", 1)
    url += f"/elevenlabs/v1/text-to-speech/{voice}/{route}?{urlencode(query)}"
    return connect(url, additional_headers=headers, open_timeout=60, max_size=16 * 2**20)


def send(ws: ClientConnection, **message) -> None:
    ws.send(json.dumps(message))


def messages(ws: ClientConnection, until=lambda message: False) -> list[dict]:
    """Every message until `until` holds for one (included) or the socket closes."""
    received = []
    try:
        while True:
            message = json.loads(ws.recv(timeout=RECEIVE_TIMEOUT_S))
            received.append(message)
            if until(message):
                return received
    except ConnectionClosed:
        return received


def audio_by_context(received: list[dict]) -> dict[str, bytes]:
    """The decoded audio of each context (key "" on stream-input)."""
    audio: dict[str, bytearray] = defaultdict(bytearray)
    for message in received:
        if message.get("audio"):
            audio[message.get("contextId", "")] += base64.b64decode(message["audio"])
    return {key: bytes(value) for key, value in audio.items()}


def finals(received: list[dict]) -> list[str]:
    return [m.get("contextId", "") for m in received if m.get("isFinal") is True]
