"""Home Assistant's Wyoming protocol: a TCP listener beside HTTP, in the ingress's own replica.

It is another ingress over the same handles: every sentence goes through the ingress's `start_speech`, so it
has HTTP's admission (busy is an `error` event), voices, limits, text normalisation, guards, utterance memory,
metrics and request log line (`protocol=wyoming`). It starts and stops with the app (the ingress's ASGI
lifespan), under `serve run` as under the launcher.

- `describe` -> `info`: one TTS program, every preset as a voice (custom voices only while no API_KEY is set:
  Wyoming has no key, and HTTP lists them only with it), `supports_synthesize_streaming`.
- `synthesize` -> `audio-start`, an `audio-chunk` per decoded frame group as it comes, `audio-stop`.
- `synthesize-start`, `synthesize-chunk`..., `synthesize-stop`: sentences are found as the text arrives
  (text/chunking.SentenceStream: the chunker's rules) and each is spoken as soon as it is complete, with the
  stream's earlier sentences as its context (their request ids, as `previous_request_ids` names them on HTTP),
  then `synthesize-stopped`. The `synthesize` copy inside a stream is ignored.
- Empty text speaks nothing: a one-shot answers `audio-start` and `audio-stop` with no chunk.

Nothing from the network is trusted: an event's header line, data and payload are bounded before they are
read (the stock reader would wait for any `data_length` a header claims), an unknown or malformed event closes
the connection, a client that leaves cancels its generation, one that stops reading is cut off after
WRITE_TIMEOUT_S with at most a bounded buffer, and connections are capped. An error is an `error` event, then
the connection closes (as wyoming-piper does).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Optional

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.info import Attribution, Info, TtsProgram, TtsVoice
from wyoming.ping import Pong
from wyoming.tts import SynthesizeStopped

from serve_app.api.request_ids import new_request_id
from serve_app.api.streaming import StartedSpeech
from serve_app.core.constants import LOGGER_NAME, SAMPLE_RATE
from serve_app.core.errors import APIError, RateLimitError, as_api_error, value_of
from serve_app.core.messages import SpeechInput, VoiceInfo
from serve_app.core.settings import Settings
from serve_app.text.chunking import SentenceStream
from serve_app.text.frontend import speakable

logger = logging.getLogger(LOGGER_NAME)

PROTOCOL = "wyoming"
WIDTH, CHANNELS = 2, 1  # s16le mono, at CSM's 24 kHz
MAX_HEADER_BYTES = 16 * 1024  # one event's JSON header line
MAX_CONNECTIONS = 64
MAX_WAITING = 64  # texts (one-shots, or a stream's sentences) a connection may have waiting
IDLE_TIMEOUT_S = 300.0  # a connection with no event for this long is closed
WRITE_BUFFER_BYTES = 256 * 1024  # per connection: beyond it a write waits (and WRITE_TIMEOUT_S cuts it off)
EVENTS = ("describe", "ping", "synthesize", "synthesize-start", "synthesize-chunk", "synthesize-stop")
ATTRIBUTION = Attribution(name="Sesame (CSM-1B)", url="https://huggingface.co/sesame/csm-1b")
LANGUAGES = ["en"]  # CSM-1B speaks English

StartSpeech = Callable[[SpeechInput, str, str, str], Awaitable[StartedSpeech]]


class ProtocolError(Exception):
    """An event this server does not take: the connection is closed (nothing is answered)."""


def _version() -> Optional[str]:
    try:
        return version("sesame-tts")
    except PackageNotFoundError:
        return None


def program_info(voices: list[VoiceInfo]) -> Info:
    """The `info` answer: one TTS program with these voices."""
    release = _version()
    return Info(
        tts=[
            TtsProgram(
                name="sesame-tts",
                description="Sesame CSM-1B conversational speech, served locally on MLX",
                attribution=ATTRIBUTION,
                installed=True,
                version=release,
                voices=[
                    TtsVoice(
                        name=v.id,
                        description=v.description,
                        attribution=ATTRIBUTION,
                        installed=True,
                        version=release,
                        languages=LANGUAGES,
                    )
                    for v in voices
                ],
                supports_synthesize_streaming=True,
            )
        ]
    )


def _length(header: dict, key: str) -> int:
    value = header.get(key) or 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{key} is not a length")
    return value


async def read_event(reader: asyncio.StreamReader, max_data: int, timeout: float) -> Optional[Event]:
    """The next event, or None at the end of the stream. Its lengths are checked before anything they claim
    is read: data beyond `max_data` or any payload (a TTS server is sent none) is a ProtocolError."""
    line = await reader.readline()  # the reader's limit bounds the line; the connection, how long it waits
    if not line.endswith(b"\n"):
        return None  # the client left (mid-line or between events)
    header = json.loads(line)
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("no event type")
    if header["type"] not in EVENTS:
        raise ProtocolError(f"unknown event {header['type'][:40]!r}")
    data_length, payload_length = _length(header, "data_length"), _length(header, "payload_length")
    if data_length > max_data or payload_length:
        raise ProtocolError(f"{data_length} bytes of data, {payload_length} of payload: more than is taken")
    data = header.get("data") or {}
    more = json.loads(await asyncio.wait_for(reader.readexactly(data_length), timeout)) if data_length else {}
    if not isinstance(data, dict) or not isinstance(more, dict):
        raise ProtocolError("data is not an object")
    return Event(type=header["type"], data={**data, **more})


def _text(data: dict, key: str = "text") -> str:
    text = data.get(key, "")
    if not isinstance(text, str):
        raise ProtocolError(f"{key} is not text")
    return text


def _voice(data: dict) -> Optional[str]:
    """The voice's name (`voice.speaker` and `voice.language` are not used: a CSM voice is one speaker, and
    speaks English); None for the default voice."""
    voice = data.get("voice") or {}
    name = voice.get("name") if isinstance(voice, dict) else None
    if name is not None and not isinstance(name, str):
        raise ProtocolError("voice.name is not text")
    return name or None


@dataclass
class _Stream:
    """A streaming synthesis: its voice, its sentences so far, and the sentences waiting to be spoken
    (None: the client sent synthesize-stop)."""

    voice: Optional[str]
    sentences: SentenceStream
    waiting: asyncio.Queue = field(default_factory=asyncio.Queue)


class Connection:
    """One client: events are read while audio is written, so a client that leaves is noticed at once."""

    def __init__(self, listener: WyomingListener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.listener, self.reader, self.writer = listener, reader, writer
        self.peer = str((writer.get_extra_info("peername") or ("?",))[0])
        self._jobs: asyncio.Queue = asyncio.Queue()  # one-shot texts and streams, spoken in order
        self._stream: Optional[_Stream] = None
        self._worker: Optional[asyncio.Task] = None
        self._speaking = False

    async def run(self) -> None:
        settings = self.listener.settings
        max_data = 4 * settings.max_input_length + 4096  # the longest text in UTF-8, and the rest of the event
        self._worker = asyncio.create_task(self._speak_jobs())
        reading: Optional[asyncio.Future] = None
        reason = "left"
        try:
            while not self._worker.done():
                reading = reading or asyncio.ensure_future(read_event(self.reader, max_data, settings.body_timeout_s))
                done, _ = await asyncio.wait(
                    {reading, self._worker}, timeout=IDLE_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
                )
                if not done and self._idle():
                    reason = "idle"
                    break
                if reading not in done:
                    continue  # still speaking (or the worker ended: the loop's test)
                event, reading = reading.result(), None
                if event is None:
                    break
                await self._handle(event)
        except (ProtocolError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            reason = f"refused: {exc}"[:200]
        except (TimeoutError, asyncio.TimeoutError):
            reason = "an event's data did not arrive in time"
        except ConnectionError:
            pass
        finally:
            for task in (reading, self._worker):
                if task is not None:
                    task.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self.writer.close()
            logger.info("wyoming: connection from %s closed (%s)", self.peer, reason)

    def _idle(self) -> bool:
        """No event for IDLE_TIMEOUT_S and nothing being spoken (a stream waiting for text counts as idle)."""
        return not self._speaking and self._jobs.empty()

    async def _handle(self, event: Event) -> None:
        kind, data = event.type, event.data
        if kind == "describe":
            await self.write(program_info(await self.listener.voices()).event())
        elif kind == "ping":
            await self.write(Pong(text=data.get("text")).event())
        elif kind == "synthesize" and self._stream is None:
            self._queue(self._jobs, (_text(data), _voice(data)))
        elif kind == "synthesize-start":
            if self._stream is not None:
                raise ProtocolError("synthesize-start inside a stream")
            self._stream = _Stream(_voice(data), SentenceStream(self.listener.settings.max_input_length))
            self._jobs.put_nowait(self._stream)
        elif kind == "synthesize-chunk" and self._stream is not None:
            for sentence in self._stream.sentences.feed(_text(data)):
                self._queue(self._stream.waiting, sentence)
        elif kind == "synthesize-stop" and self._stream is not None:
            for sentence in self._stream.sentences.finish():
                self._queue(self._stream.waiting, sentence)
            self._stream.waiting.put_nowait(None)
            self._stream = None
        elif kind != "synthesize":  # the compatibility copy of a stream's text says nothing new
            raise ProtocolError(f"{kind} outside a stream")

    @staticmethod
    def _queue(queue: asyncio.Queue, item) -> None:
        """Texts wait their turn, a bounded number of them: a client may not pile up work without end."""
        if queue.qsize() >= MAX_WAITING:
            raise ProtocolError(f"more than {MAX_WAITING} texts waiting to be spoken")
        queue.put_nowait(item)

    async def write(self, event: Event) -> None:
        """One event, within WRITE_TIMEOUT_S: a client that takes nothing for that long is cut off."""
        try:
            await asyncio.wait_for(async_write_event(event, self.writer), self.listener.settings.write_timeout_s)
        except (TimeoutError, asyncio.TimeoutError):
            raise ConnectionError(
                f"the client took no audio for {self.listener.settings.write_timeout_s:g} s"
            ) from None

    async def _speak_jobs(self) -> None:
        """Each job in turn; an error is an `error` event, and ends the connection."""
        try:
            while True:
                job = await self._jobs.get()
                if isinstance(job, _Stream):
                    await self._speak_stream(job)
                else:
                    await self._speak(*job)
        except ConnectionError as exc:
            logger.info("wyoming: %s: %s", self.peer, exc)
        except Exception as exc:  # APIError's typed refusals; anything else as the 500 it would be on HTTP
            error = as_api_error(exc)
            try:
                await self.write(Error(text=_error_text(error), code=error.code).event())
            except ConnectionError:
                pass

    async def _speak_stream(self, stream: _Stream) -> None:
        await self.listener.check_voice(stream.voice)  # an unknown voice is refused before any text
        said: list[str] = []
        turns = self.listener.settings.conversation_turns  # the latest sentences, as a conversation keeps
        while (sentence := await stream.waiting.get()) is not None:
            if self.listener.speakable(sentence):  # a markdown rule or an emoji alone is no sentence
                said.append(await self._speak(sentence, stream.voice, said[-turns:]))
        await self.write(SynthesizeStopped().event())

    async def _speak(self, text: str, voice: Optional[str], earlier: Optional[list[str]] = None) -> str:
        """One text's audio-start, chunks and audio-stop; its request id."""
        request_id = new_request_id()
        if not self.listener.speakable(text):  # an empty clip, and the model is not asked
            await self.listener.check_voice(voice)
            for event in (AudioStart(SAMPLE_RATE, WIDTH, CHANNELS), AudioStop()):
                await self.write(event.event())
            return request_id
        speech = SpeechInput(
            text, voice, previous_request_ids=list(earlier or []) or None, custom_voices=self.listener.custom_voices
        )
        self._speaking = True
        try:
            started = await self.listener.start_speech(speech, "pcm", request_id, PROTOCOL)
            try:
                await self.write(AudioStart(SAMPLE_RATE, WIDTH, CHANNELS).event())
                async for pcm in started.audio():
                    await self.write(AudioChunk(SAMPLE_RATE, WIDTH, CHANNELS, pcm).event())
                await self.write(AudioStop().event())
            finally:
                started.close()
        finally:
            self._speaking = False
        return request_id


def _error_text(exc: APIError) -> str:
    if isinstance(exc, RateLimitError):
        return f"The server is busy: retry in {exc.retry_after} s."
    return exc.message


class WyomingListener:
    """The Wyoming TCP server of one ingress replica; `start` and `stop` follow the app's lifespan."""

    def __init__(self, settings: Settings, host: str, start_speech: StartSpeech, frontend: Any):
        self.settings, self.host = settings, host
        self.start_speech = start_speech
        self._frontend = frontend
        self.custom_voices = settings.api_key is None  # without a key everyone may use them, as on HTTP
        self._server: Optional[asyncio.base_events.Server] = None
        self._connections: set[asyncio.Task] = set()
        self.error: Optional[str] = None  # why it does not listen

    async def start(self) -> bool:
        """Listen; a port that cannot be had is an error in the log and in /health, and HTTP goes on."""
        try:
            self._server = await asyncio.start_server(
                self._accept, self.host, self.settings.wyoming_port, limit=MAX_HEADER_BYTES
            )
        except OSError as exc:
            self.error = f"cannot listen on {self.host}:{self.settings.wyoming_port}: {exc.strerror or exc}"
            logger.error("wyoming: %s", self.error)
            return False
        logger.info("wyoming: listening on %s:%d", self.host, self.settings.wyoming_port)
        return True

    def speakable(self, text: str) -> bool:
        """Whether the text frontend would find something to speak (its own check: text/frontend.py)."""
        return speakable(text, self.settings.strip_markdown)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    def report(self) -> dict:
        report = {"host": self.host, "port": self.settings.wyoming_port, "connections": len(self._connections)}
        return {**report, "error": self.error} if self.error else report

    async def voices(self) -> list[VoiceInfo]:
        return await self._frontend.voices.remote(include_custom=self.custom_voices)

    async def check_voice(self, voice: Optional[str]) -> None:
        await value_of(self._frontend.check_voice.remote(voice, self.custom_voices))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= MAX_CONNECTIONS:
            logger.warning("wyoming: %d connections already: one more refused", MAX_CONNECTIONS)
            writer.close()
            return
        writer.transport.set_write_buffer_limits(high=WRITE_BUFFER_BYTES)
        connection = writer.get_extra_info("socket")
        if connection is not None:  # the kernel's share of the buffering is bounded too (PCM is ~48 kB/s)
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, WRITE_BUFFER_BYTES)
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            await Connection(self, reader, writer).run()
        except Exception as exc:  # a bug: logged once, the listener goes on
            logger.warning("wyoming: connection failed: %s", as_api_error(exc).message)
        finally:
            self._connections.discard(task)
