"""Talking to a server's Wyoming port with the wyoming package's own client: where it listens (from
/health), reading events up to one of some types, and a stream's PCM as samples."""

from __future__ import annotations

import asyncio
import re

import numpy as np
from wyoming.client import AsyncTcpClient
from wyoming.event import Event

READ_S = 120  # per event: a loaded machine is slow, not stuck


def wyoming_port(server) -> int:
    report = server.health().json()["wyoming"]
    assert report["host"] == "127.0.0.1"
    return report["port"]


def client(server) -> AsyncTcpClient:
    return AsyncTcpClient("127.0.0.1", wyoming_port(server))


async def read_until(client: AsyncTcpClient, *types: str) -> list[Event]:
    """Events up to and including the first of `types`; an AssertionError if the connection ends first."""
    events = []
    while True:
        event = await asyncio.wait_for(client.read_event(), READ_S)
        assert event is not None, f"the connection ended after {[(e.type, e.data) for e in events]}"
        events.append(event)
        if event.type in types:
            return events


async def closed(client: AsyncTcpClient) -> bool:
    """Whether the server closes the connection (after whatever it still sends)."""
    while True:
        event = await asyncio.wait_for(client.read_event(), READ_S)
        if event is None:
            return True


def pcm(events: list[Event]) -> np.ndarray:
    """The audio chunks' samples, as floats."""
    audio = b"".join(e.payload or b"" for e in events if e.type == "audio-chunk")
    return np.frombuffer(audio, "<i2").astype(np.float32) / 32768.0


def request_lines(log: str, protocol: str = "wyoming") -> list[dict]:
    """The request log lines of a protocol, oldest first, as {field: value}."""
    lines = [line for line in log.splitlines() if "request id=" in line and f"protocol={protocol}" in line]
    return [dict(re.findall(r"(\w+)=(\S+)", line.split("request ", 1)[1])) for line in lines]
