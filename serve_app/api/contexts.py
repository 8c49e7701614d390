"""A speech context: text that arrives in pieces, spoken as one CSM conversation into one audio stream.

It is what an ElevenLabs WebSocket context is (api/sockets.py), and what the with-timestamps routes run
(api/elevenlabs.py). Text is cut into pieces as it arrives (with `auto_mode`, every message is a piece; else
whole sentences by the chunker's rules, what `flush` asks for, and what `chunk_length_schedule` lets go).
Each piece is its own request through the ingress's `start_speech` (HTTP's admission, voices, limits,
normalisation, guards), generated with the context's earlier pieces as its context (their request ids, as
`previous_request_ids` names them), and each piece starts as soon as the one before it has been generated.

- **One stream**: the pieces' PCM goes through one encoder for the whole context (one ffmpeg process, so an
  mp3 or ogg stream is one continuous stream; raw PCM at 24 kHz needs none).
- **Alignment**: a piece's length is exact (its PCM), so every piece's start and end are; the characters
  inside it are estimated (text/alignment.py). Each piece's alignment comes right after its last audio,
  its times counted from the piece's first audio, so the alignments tile the context's audio exactly.
- **Closing**: `close` speaks what was flushed to its end; text that was never flushed (a barge-in) is
  dropped, and a piece being generated from it is cancelled at once (its generation stops within a frame
  group). `cancel` drops everything (the socket went away).
- **One log line**: the pieces' records are parts of the context's one record (core/observability.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Optional

from serve_app.api.request_ids import new_request_id
from serve_app.audio.ffmpeg import ffmpeg_command
from serve_app.audio.pool import Process, kill, start
from serve_app.core.constants import SAMPLE_RATE
from serve_app.core.errors import GenerationError, InvalidRequestError, ServiceUnavailableError, status_of
from serve_app.core.formats import FORMATS
from serve_app.core.messages import SpeechInput
from serve_app.core.observability import RequestRecord
from serve_app.core.settings import Settings
from serve_app.text.alignment import Alignment, estimate
from serve_app.text.chunking import SentenceStream
from serve_app.text.frontend import speakable, spoken_text

READ_SIZE = 16 * 1024
MAX_WAITING = 64  # pieces a context may have waiting to be spoken

# What a context hands its listener, in order: ("audio", bytes), ("alignment", (Alignment, Alignment)) with
# the text as given and as spoken, and nothing after the last (the context's task then ends).
Emit = Callable[[str, object], Awaitable[None]]


@dataclass
class _Piece:
    text: str
    flushed: bool = False


class _Encoder:
    """The context's one encoder: PCM in, the format's bytes out as ffmpeg makes them (emitted from a reader
    task); raw 24 kHz PCM is passed through."""

    def __init__(self, ffmpeg: Optional[str], fmt: str, emit: Emit):
        self._ffmpeg, self._fmt, self._emit = ffmpeg, fmt, emit
        self._passthrough = FORMATS[fmt].raw_pcm
        self._proc: Optional[Process] = None
        self._reader: Optional[asyncio.Task] = None

    async def feed(self, pcm: bytes) -> None:
        if self._passthrough:
            await self._emit("audio", pcm)
            return
        if self._proc is None:
            if self._ffmpeg is None:
                raise ServiceUnavailableError(
                    "Audio encoding is unavailable: ffmpeg was not found.", code="ffmpeg_unavailable"
                )
            self._proc = await start(ffmpeg_command(self._ffmpeg, self._fmt))
            self._reader = asyncio.create_task(self._read(self._proc))
        try:
            self._proc.stdin.write(pcm)
            await self._proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            await self.finish()  # its exit says why

    async def _read(self, proc: Process) -> None:
        while data := await proc.stdout.read(READ_SIZE):
            await self._emit("audio", data)

    async def finish(self) -> None:
        """Everything fed, encoded and emitted."""
        if self._proc is None:
            return
        proc, reader = self._proc, self._reader
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, RuntimeError):
            proc.stdin.close()
        await reader
        if await proc.wait() != 0:
            stderr = (await proc.stderr.read()).decode(errors="replace").strip()
            raise GenerationError(f"Audio encoding failed (ffmpeg exited {proc.returncode}): {stderr[-200:]}")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await kill(self._proc)


class SpeechContext:
    """One context. `add_text`, `flush`, `close` and `cancel` come from the listener's reader; `task` speaks
    and ends once the context is closed and drained (or raises the error that ended it)."""

    def __init__(
        self,
        start_speech,
        settings: Settings,
        ffmpeg: Optional[str],
        *,
        voice: Optional[str],
        fmt: str,
        speed: float,
        protocol: str,
        emit: Emit,
        custom_voices: bool,
        auto_mode: bool = False,
        schedule: Sequence[int] = (),
        alignment: bool = True,
        stitching: Optional[SpeechInput] = None,
        request_id: Optional[str] = None,
    ):
        self._start_speech, self._settings = start_speech, settings
        self._voice, self._speed, self._custom_voices = voice, speed, custom_voices
        self._emit, self._auto_mode, self._schedule = emit, auto_mode, list(schedule)
        self._alignment = alignment and settings.alignment
        self._encoder = _Encoder(ffmpeg, fmt, emit)
        self._sentences = SentenceStream(settings.max_input_length)
        self._waiting: deque[_Piece] = deque()
        self._current: Optional[_Piece] = None
        self._wake = asyncio.Event()
        self._closed = False
        self._released = 0  # pieces let go by the schedule so far
        self._spoken = 0  # pieces spoken so far
        # An HTTP request's own context: its seed, and its earlier requests (ids or text) before the first piece.
        self._stitching = stitching or SpeechInput("")
        self.record = RequestRecord(request_id or new_request_id(), speed=speed, protocol=protocol)
        self.record.fmt = fmt
        self.task = asyncio.create_task(self._run())

    # -- from the listener ------------------------------------------------------------------------------

    def add_text(self, text: str) -> None:
        if self._closed or not text:
            return
        self.record.characters += len(text)
        if self._auto_mode:
            self._queue(text)
            return
        for sentence in self._sentences.feed(text):
            self._queue(sentence)
        threshold = self._schedule[min(self._released, len(self._schedule) - 1)] if self._schedule else None
        if threshold is not None and (piece := self._sentences.release(threshold)):
            self._released += 1
            self._queue(piece)

    def flush(self) -> None:
        """Everything so far is to be spoken, also an unfinished sentence, and to its end even if closed."""
        for sentence in self._sentences.finish():
            self._queue(sentence)
        for piece in (self._current, *self._waiting):
            if piece is not None:
                piece.flushed = True

    def close(self) -> None:
        """No more text: what was flushed is spoken to its end; what was not is dropped, and a piece being
        generated from unflushed text is cancelled (a barge-in)."""
        self._closed = True
        self._sentences.finish()
        flushed = [p for p in self._waiting if p.flushed]
        self._waiting = deque(flushed)
        if self._current is not None and not self._current.flushed:
            self.task.cancel()
        self._wake.set()

    def cancel(self) -> None:
        self._closed = True
        self.task.cancel()

    @property
    def open(self) -> bool:
        return not self._closed

    @property
    def idle(self) -> bool:
        """Nothing being spoken or waiting (an open context waiting for text, or one that has ended)."""
        return self.task.done() or (self._current is None and not self._waiting and not self._closed)

    def _queue(self, text: str) -> None:
        if len(self._waiting) >= MAX_WAITING:
            raise InvalidRequestError(f"More than {MAX_WAITING} pieces of text are waiting to be spoken.")
        self._waiting.append(_Piece(text))
        self._wake.set()

    # -- the speaking task --------------------------------------------------------------------------------

    async def _next(self) -> Optional[_Piece]:
        while not self._waiting:
            if self._closed:
                return None
            self._wake.clear()
            await self._wake.wait()
        return self._waiting.popleft()

    async def _run(self) -> None:
        record, said = self.record, list(self._stitching.previous_request_ids or [])
        turns = self._settings.conversation_turns
        try:
            while (piece := await self._next()) is not None:
                if not speakable(piece.text, self._settings.strip_markdown):  # a markdown rule, a lone emoji
                    continue
                self._current = piece
                said.append(await self._speak(piece.text, said[-turns:]))
                self._current = None
            await self._encoder.finish()
            record.finish("ok")
        except asyncio.CancelledError:
            record.finish("cancelled")
            raise
        except BaseException as exc:
            record.finish(str(status_of(exc)))
            raise
        finally:
            await self._encoder.close()

    async def _speak(self, text: str, earlier: list[str]) -> str:
        """One piece through the ingress and the context's encoder; its alignment after its audio."""
        request_id = new_request_id()
        speech = SpeechInput(
            text,
            self._voice,
            self._speed,
            self._stitching.seed,
            previous_request_ids=earlier or None,
            previous_text=None if self._spoken else self._stitching.previous_text,
            custom_voices=self._custom_voices,
        )
        started = await self._start_speech(speech, "pcm", request_id, self.record.protocol, part_of=self.record)
        samples = 0
        try:
            async for pcm in started.audio():
                if self.record.first_byte is None:
                    self.record.mark_first_byte()
                samples += len(pcm) // 2
                await self._encoder.feed(pcm)
        finally:
            started.close()
        if self._alignment:
            # After the first piece, a leading space: a client that joins the characters across alignments
            # (Pipecat, LiveKit) would otherwise run the last word of one piece into the first of the next.
            lead = " " if self._spoken else ""
            duration_ms = round(1000 * samples / SAMPLE_RATE)
            spoken = lead + spoken_text(text, self._settings.strip_markdown).strip()
            await self._emit("alignment", (estimate(lead + text, duration_ms), estimate(spoken, duration_ms)))
        self._spoken += 1
        return request_id


def whole(alignments: list[tuple[Alignment, Alignment]]) -> tuple[Optional[dict], Optional[dict]]:
    """Pieces' alignments as one, in ElevenLabs' HTTP form (times from the start of the response)."""
    if not alignments:
        return None, None
    forms = []
    for index in (0, 1):
        chars: list[str] = []
        starts: list[int] = []
        durations: list[int] = []
        offset = 0
        for pair in alignments:  # (each piece after the first starts with its space)
            part = pair[index]
            chars += part.chars
            starts += [offset + s for s in part.starts_ms]
            durations += part.durations_ms
            offset += part.duration_ms
        forms.append(Alignment(chars, starts, durations).http())
    return forms[0], forms[1]
