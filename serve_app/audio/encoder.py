"""AudioEncoder: one ffmpeg process per response, fed from the model's PCM stream (raw PCM at normal speed
passes straight through). The process is usually one started ahead of need (audio/pool.py), so the first
bytes do not wait for ffmpeg to start.

A DeploymentResponseGenerator cannot be passed to another deployment (ray#57098), so this stage calls the
model itself: it sends the model its request, then starts ffmpeg (ffmpeg's start-up overlaps generation),
writes PCM into ffmpeg as it arrives and yields ffmpeg's output as soon as ffmpeg flushes it. Whatever
way the response ends (done, error, client gone), ffmpeg is killed and the model stream cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator

import numpy as np

from serve_app.audio.ffmpeg import atempo_chain, decode_command, ffmpeg_command, find_ffmpeg, is_mp4, upload_kind
from serve_app.audio.pool import WarmProcesses, kill, start
from serve_app.core.constants import LOGGER_NAME
from serve_app.core.errors import APIError, GenerationError, InvalidRequestError, ServiceUnavailableError
from serve_app.core.formats import FORMATS
from serve_app.core.health import EncoderHealth
from serve_app.core.logs import configure_logging
from serve_app.core.messages import EncodeRequest, StageTimes, StreamItem, Usage
from serve_app.core.settings import Settings

logger = logging.getLogger(LOGGER_NAME)

READ_SIZE = 64 * 1024
DECODE_TIMEOUT_S = 60  # an upload of at most 10 MiB decodes in well under a second; past this it is hostile


class AudioEncoder:
    def __init__(self, settings: Settings, model):
        configure_logging(settings.log_level)
        # With a model replica on each machine, the one on this encoder's node first: the PCM stays local.
        try:
            model._init(_prefer_local_routing=True)
        except (AttributeError, TypeError, RuntimeError):  # Serve's local testing mode: one process, no routing
            pass
        self._model = model
        self._ffmpeg, self._ffmpeg_info = find_ffmpeg(settings.ffmpeg_path)
        self._running = 0  # ffmpeg processes alive now (a leak would show here and in the soak test)
        self._warm = WarmProcesses(settings.ffmpeg_warm)
        if self._ffmpeg is None:
            logger.error("%s", self._ffmpeg_info)

    async def check_health(self) -> None:
        """Serve calls this every few seconds: the time to start the default format's warm ffmpeg."""
        if self._ffmpeg is not None and self._warm.per_command:
            self._warm.fill(tuple(ffmpeg_command(self._ffmpeg, "mp3")))

    async def health(self) -> EncoderHealth:
        return EncoderHealth(
            ok=self._ffmpeg is not None,
            ffmpeg=self._ffmpeg_info,
            running=self._running,
            warm=self._warm.idle,
            warm_pids=self._warm.pids,
        )

    def __del__(self):
        if hasattr(self, "_warm"):
            self._warm.kill_now()

    async def encode(self, request: EncodeRequest) -> AsyncIterator[StreamItem]:
        """Encoded audio bytes as ffmpeg produces them, then the model's `Usage`."""
        if self._ffmpeg is None:
            raise ServiceUnavailableError(
                f"Audio encoding is unavailable: {self._ffmpeg_info}", code="ffmpeg_unavailable"
            )
        # The model first: its request is on its way while ffmpeg starts (or is taken warm).
        started = time.perf_counter()
        pcm = self._model.options(stream=True).generate.remote(request.synthesis)
        if FORMATS[request.response_format].raw_pcm and atempo_chain(request.speed) is None:
            # Raw PCM at normal speed is exactly what the model produces: no ffmpeg, no pipe, no extra CPU.
            try:
                first = True
                async for item in pcm:
                    if first:
                        yield StageTimes(stages={"model": _ms(started)})
                        first = False
                    yield item
            finally:
                pcm.cancel()
            return
        cmd = ffmpeg_command(self._ffmpeg, request.response_format, request.speed)
        keep_warm = atempo_chain(request.speed) is None and self._warm.per_command > 0
        try:
            proc = await self._warm.take(cmd, keep_warm=keep_warm)
        except BaseException:
            pcm.cancel()
            raise
        self._running += 1
        first_pcm: list[float] = []  # when the model's first PCM reached this process
        feeder = asyncio.create_task(self._feed(pcm, proc, first_pcm))
        try:
            reported, chunks = False, 0
            while data := await proc.stdout.read(READ_SIZE):
                if first_pcm and not reported:  # the first encoded bytes: the model's time, then ffmpeg's
                    model_ms = 1000 * (first_pcm[0] - started)
                    yield StageTimes(stages={"model": round(model_ms, 1), "encode": round(_ms(started) - model_ms, 1)})
                    reported = True
                yield data
                chunks += 1
                if chunks == 2 and keep_warm:  # the first audio is out: the next response's ffmpeg starts
                    self._warm.fill(tuple(cmd))
                    keep_warm = False
            said = await feeder  # the model's error, if it failed, surfaces here
            if await proc.wait() != 0:
                stderr = (await proc.stderr.read()).decode(errors="replace").strip()
                raise GenerationError(f"Audio encoding failed (ffmpeg exited {proc.returncode}): {stderr[-300:]}")
            for item in said:  # the Utterance (when remembered), then the Usage
                yield item
        finally:
            feeder.cancel()
            # Its exception (if any) was raised above or is moot now; don't log it as "never retrieved".
            feeder.add_done_callback(lambda task: task.cancelled() or task.exception())
            pcm.cancel()
            try:
                await kill(proc)
            finally:
                self._running -= 1
                if keep_warm:  # (a response shorter than two chunks)
                    self._warm.fill(tuple(cmd))

    async def decode(self, data: bytes, max_s: float, param: str) -> np.ndarray | APIError:
        """An uploaded recording as float32 24 kHz mono, at most `max_s` seconds (+1 frame, so a longer clip
        can be told from one that fits). Bytes that are not audio come back as a 400 value (an expected
        outcome, not a replica error)."""
        if self._ffmpeg is None:
            return ServiceUnavailableError(
                f"Audio decoding is unavailable: {self._ffmpeg_info}", code="ffmpeg_unavailable"
            )
        pcm, reason = await self._decode(decode_command(self._ffmpeg, max_s + 0.08), data)
        if pcm is None and is_mp4(data):  # an MP4 whose index comes after the audio: a pipe cannot seek to it
            with tempfile.TemporaryDirectory(prefix="sesame-upload-") as folder:  # 0700, removed at once
                path = os.path.join(folder, "upload.mp4")
                with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
                    file.write(data)
                pcm, reason = await self._decode(decode_command(self._ffmpeg, max_s + 0.08, seekable=path), b"")
                reason = reason.replace(path, "upload")
        if pcm is None:
            received = f"{len(data):,} bytes of {upload_kind(data)}"
            logger.info("upload in %r not decoded (%s): %s", param, received, reason[:200])
            return InvalidRequestError(
                f"The file in '{param}' is not audio this server can read: it received {received} ({reason[:200]}). "
                "Send mpeg, wav, ogg, aac, flac, webm or mp4 audio.",
                param=param,
                code="invalid_audio",
            )
        return pcm

    async def _decode(self, command: list[str], data: bytes) -> tuple[np.ndarray | None, str]:
        """(PCM, "") from one ffmpeg run, or (None, why it failed)."""
        proc = await start(command)
        self._running += 1
        try:
            out, err = await asyncio.wait_for(proc.communicate(data), DECODE_TIMEOUT_S)
        except asyncio.TimeoutError:
            return None, f"not decoded in {DECODE_TIMEOUT_S} s"
        finally:
            await kill(proc)
            self._running -= 1
        pcm = np.frombuffer(out[: len(out) // 4 * 4], dtype="<f4")
        if proc.returncode != 0 or not len(pcm) or not np.isfinite(pcm).all():
            return None, (err.decode(errors="replace").strip().splitlines()[-1:] or ["no audio in it"])[0]
        return pcm.copy(), ""

    @staticmethod
    async def _feed(pcm, proc: asyncio.subprocess.Process, first_pcm: list) -> list:
        """Copy the model's PCM into ffmpeg and return the model's other items (its Utterance when asked for,
        its Usage) for after the audio; on a model error kill ffmpeg so the reader stops at once. `first_pcm`
        gets the time the first PCM arrived."""
        said: list = []
        try:
            async for item in pcm:
                if not first_pcm:
                    first_pcm.append(time.perf_counter())
                if not isinstance(item, bytes):
                    said.append(item)
                elif not await _write(proc, item):
                    break  # ffmpeg is gone; the reader sees EOF and its exit code says why
            else:
                proc.stdin.close()
            return said if any(isinstance(item, Usage) for item in said) else [*said, Usage()]
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise


async def _write(proc: asyncio.subprocess.Process, data: bytes) -> bool:
    """Write to ffmpeg's stdin; False once ffmpeg has exited (a dead pipe or a closed transport)."""
    if proc.stdin.is_closing():
        return False
    try:
        proc.stdin.write(data)
        await proc.stdin.drain()
        return True
    except (BrokenPipeError, ConnectionResetError, RuntimeError):
        return False


def _ms(since: float) -> float:
    return round(1000 * (time.perf_counter() - since), 1)
