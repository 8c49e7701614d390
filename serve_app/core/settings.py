"""Every env-tunable setting of the server, in one place.

Values come from the process environment and an optional `.env` file (the environment wins). They are
validated once, at start-up, and a bad value stops the server with a message naming the variable. The
Serve app builder loads them and hands the same `Settings` object to every deployment through `.bind()`,
because the builder runs in its own process and its environment does not reach the replicas.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Optional

from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from serve_app.core.constants import PROJECT_ROOT, SLOW_CHARS_PER_S
from serve_app.core.formats import ResponseFormat

# RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens.
_HOST_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


# Settings that had another name, still read under it (the new name wins when both are set).
RENAMED_SETTINGS = {"NORMALIZE_TEXT": "STRIP_MARKDOWN"}  # it strips markdown; normalize() is another thing

# The settings that are secrets: never logged, never handed to Ray (see `without_secrets`).
SECRET_SETTINGS = ("API_KEY", "HF_TOKEN")


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the variable and the problem."""


class Settings(BaseModel):
    """Validated server settings. Field names are the environment variable names, lower-cased."""

    # Each field's docstring is its documentation: docs/pages/reference/configuration.md is generated from them
    # (`python -m serve_app.tools.docs --write`), and a test fails when the page and this class differ.
    model_config = ConfigDict(extra="ignore", frozen=True, validate_default=True, use_attribute_docstrings=True)

    # The server.
    host: str = "0.0.0.0"
    """Listen address. `0.0.0.0` serves your network (every device on it can ask for speech; only this machine
    can create or delete voices unless API_KEY is set); `127.0.0.1` keeps the server to this machine."""
    port: int = Field(8880, ge=1, le=65535)
    """Listen port (HTTP)."""
    wyoming_port: int = Field(0, ge=0, le=65535)
    """Home Assistant's Wyoming protocol on this TCP port (on HOST, beside HTTP; the documented value is 10200);
    0 turns it off. Same voices, admission, limits and request log line as HTTP (docs: Home Assistant)."""
    wyoming_zeroconf: bool = True
    """With WYOMING_PORT on and a LAN-facing HOST, announce `_wyoming._tcp.local.` on the LAN address, so Home
    Assistant discovers the server by itself. Off: add it by hand (host and port)."""
    wyoming_without_key: bool = False
    """Wyoming has no authentication. With API_KEY set and a LAN-facing HOST, the Wyoming port listens on
    127.0.0.1 only, unless this says that anyone on the network may ask it for speech without the key (custom
    voices stay unusable over Wyoming while a key is set)."""
    alignment: bool = True
    """Character timing (ElevenLabs' `alignment`) on the WebSocket and with-timestamps routes: each sentence's
    start and end are exact, the characters inside it are estimated (docs: Voice agents). Off: null."""
    model_id: str = Field("mlx-community/csm-1b", min_length=1)
    """A Hugging Face repo id, downloaded once into CACHE_DIR, or a local checkpoint folder (never completed from
    the network). `sesame/csm-1b` is gated: it needs HF_TOKEN."""
    cache_dir: Path = Path("~/.cache/sesame-tts")
    """Downloads, the log, the PID file, custom voices and generated files."""
    default_voice: str = "conversational"
    """The voice of a request that names none: a preset or an alias."""
    default_format: ResponseFormat = "mp3"
    """The `response_format` of a request that names none."""
    max_input_length: int = Field(4096, ge=1, le=100_000)
    """The longest accepted `input`, in characters (as sent, before markdown is taken out)."""
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    """How much the server logs."""
    access_log: bool = False
    """Ray Serve's access lines: one per call in every deployment (five for each `/health` poll). Off by
    default; every speech request has its own `request id=...` line either way."""

    # Who may call.
    api_key: Optional[SecretStr] = None
    """When set, speech and every other `/v1` call but the lists need `Authorization: Bearer <API_KEY>`
    (ElevenLabs routes: `xi-api-key` too), checked on the headers before any body is read (else 401). `/health`
    stays open, with details only with the key or from this machine. Never logged, never handed to Ray. Set
    but empty is refused at start. Unset: voices and consents can be created or deleted from this machine
    only."""
    lists_need_api_key: bool = False
    """Whether `/v1/models`, `/v1/audio/models` and `/v1/audio/voices` need the key too. Off: Open WebUI
    fetches these lists without a key and silently falls back to OpenAI's voice names when refused. Without
    the key they list the presets only, never custom voices."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names the server answers to besides its own names and addresses (comma-separated), e.g. a reverse
    proxy's public name; `*` turns the check off. Any other `Host` gets 403 `host_not_allowed` (DNS
    rebinding)."""
    cors_origins: tuple[str, ...] = ()
    """Browser origins (`https://app.example:3000`, comma-separated; `*`: any) that may make state-changing
    requests and read the answers (CORS). Other pages' origins get 403 `origin_not_allowed`; clients that
    send no `Origin` (SDKs, curl, OpenClaw) are not affected."""
    body_timeout_s: float = Field(10.0, ge=1.0, le=600.0)
    """A request's body is due within this many seconds of its first byte, plus what has arrived at
    BODY_MIN_RATE; a client that falls behind gets 408 `request_timeout`."""
    body_min_rate: int = Field(64 * 1024, ge=1024)
    """The slowest body upload accepted after BODY_TIMEOUT_S, in bytes per second."""
    write_timeout_s: float = Field(30.0, ge=1.0, le=3600.0)
    """A response the client takes no bytes of for this long ends: Serve's proxy resets the connection and the
    request is cancelled, so a client that stops reading cannot keep its response in memory. A client that
    reads at all (a player taking opus in real time) is never cut off."""

    # The model.
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Weight dtype; bfloat16 keeps CSM-1B at ~3.1 GB."""
    mlx_device: Literal["auto", "cpu", "gpu"] = "auto"
    """`auto`: the GPU where MLX has one (Metal on a Mac), else the CPU."""
    mimi_dtype: Literal["float32", "bfloat16"] = "float32"
    """The Mimi codec's dtype. `float32` is how Sesame's reference runs it; `bfloat16` saves ~0.24 GB and
    decodes faster on a CPU, with slightly different prompt codes and audio (~36 dB SNR against float32)."""
    quantize: Literal[0, 4, 8] = 0
    """`8` or `4`: quantize the backbone, depth decoder and embeddings at load (less memory and, on Apple
    GPUs, less bandwidth per frame; no speed on MLX's CPU backend). `0`: off."""
    mlx_compile: Literal["auto", "on", "off"] = "auto"
    """Compile each steady frame as one function per shape, and Mimi's codebook decode per batch size. `auto`:
    on a GPU only (MLX's CPU backend compiles with a C++ compiler, ~30 s per new shape when cold). The audio is
    byte-identical either way (tested)."""
    pipeline: bool = True
    """Pipelined frame loop: frame N+1 is launched on the device before frame N is read on the host. The audio
    is byte-identical either way (tested)."""
    model_replicas: str = "1"
    """Model replicas, at most one per machine of a Ray cluster; `auto`: one on every node that declares the
    `mlx` resource (all nodes if none does). Counted when the app starts: restart after adding a machine."""
    max_batch_size: int = Field(8, ge=1, le=64)
    """Requests that generate together in one batched forward pass (continuous batching); `1` generates one at
    a time."""
    hf_token: Optional[SecretStr] = None
    """Hugging Face token, only for gated repos such as `sesame/csm-1b`. Never logged, never handed to Ray."""
    secrets_file: Optional[Path] = None
    """Set by the launcher: the 0600 file in CACHE_DIR where the replicas read API_KEY and HF_TOKEN, so the
    secrets never travel in the app's arguments or runtime_env, which Ray stores and logs."""
    hf_endpoint: Optional[str] = None
    """The hub's address (a mirror); unset: huggingface_hub's default."""
    tokenizer_id: str = "unsloth/Llama-3.2-1B"
    """Where a hub checkpoint without `tokenizer.json` gets its Llama 3.2 tokenizer (tokenizer files only)."""
    mimi_id: str = "kyutai/moshiko-pytorch-bf16"
    """Where a hub checkpoint without `mimi/` gets the Mimi codec."""
    mimi_file: str = "tokenizer-e351c8d8-checkpoint125.safetensors"
    """The Mimi weights file in MIMI_ID."""

    # Text.
    strip_markdown: bool = True
    """Take markdown and emoji out before speaking: emphasis, headings, bullets, links (their text stays),
    inline code (its text stays), fenced code blocks (dropped), tables (cells read with commas), HTML tags,
    emoji. Every word of plain prose stays, in order. Its old name NORMALIZE_TEXT is still read."""
    first_chunk_max_chars: int = Field(100, ge=20)
    """The first text chunk's longest length: short, so speech starts early."""
    chunk_max_chars: int = Field(220, ge=20, le=1000)
    """Every later text chunk's longest length."""

    # Context and caches.
    prefix_cache: bool = True
    """Backbone KV reuse: each voice's reference clip is prefilled once at load and requests start from it; a
    request's next text chunk continues its own cache row. `false`: every chunk re-prefills its whole context
    (the reference path; the same codes, slower)."""
    voice_cache_mb: int = Field(512, ge=0)
    """Memory the voices' prefilled prefixes may hold, least recently used out first (~32 KB per position with
    CSM-1B in bf16, ~11 MB for a 350-position clip)."""
    utterance_memory_mb: float = Field(64.0, ge=0.0)
    """What each response said (text and Mimi codes, ~48 KB per minute of speech), kept under its request id
    for conversation context, least recently used out first; `0`: off."""
    utterance_max_age_s: float = Field(3600.0, gt=0.0)
    """How long a remembered utterance can be named in `previous_request_ids`."""
    conversation_turns: int = Field(3, ge=1, le=16)
    """A `conversation` keeps its last this many turns as context."""
    conversation_max_age_s: float = Field(1800.0, gt=0.0)
    """A `conversation` is forgotten this long after its latest turn."""
    prefill_step_positions: int = Field(128, ge=8, le=2048)
    """While other requests stream, a joining prompt is prefilled at most this many positions per batch step,
    between their frames, so a long context never stalls them for long."""

    # Streaming.
    first_group_frames: int = Field(2, ge=1, le=50)
    """Frames (80 ms each) in a response's first streamed piece: small, for a fast first byte."""
    group_frames: int = Field(6, ge=1, le=100)
    """Frames (80 ms each) in every later streamed piece."""

    # Runaway and failure-mode guards (engine/guards.py; docs/internals.md).
    max_audio_base_s: float = Field(2.0, ge=0.08)
    """Frame cap: a text chunk stops after this many seconds plus MAX_AUDIO_S_PER_CHAR per character, even if
    CSM never ends it (22 s for 200 characters by default)."""
    max_audio_s_per_char: float = Field(round(1.0 / SLOW_CHARS_PER_S, 4), ge=0.0)
    """Frame cap per character: the default allows the text at a slow 10 characters a second. `0.12` is the
    cap from before the guards (26 s for 200 characters)."""
    terminal_punctuation: bool = True
    """Every chunk ends with terminal punctuation before CSM sees it (a chunk without one tends to lose its last
    word)."""
    guard_loop: bool = True
    """A chunk whose codebook-0 codes repeat over GUARD_LOOP_WINDOW_S ends there."""
    guard_loop_window_s: float = Field(2.0, ge=0.4, le=10.0)
    """How long a repetition must last before the loop guard ends a chunk."""
    guard_silent_tail: bool = True
    """After a chunk has spoken, a quiet run of GUARD_SILENT_TAIL_S ends it and only GUARD_PAUSE_S of it is
    kept; the pause between two chunks is also kept to at most GUARD_PAUSE_S."""
    guard_silence_dbfs: float = Field(-45.0, ge=-120.0, le=0.0)
    """An 80 ms frame is quiet below this RMS level."""
    guard_silent_tail_s: float = Field(1.5, ge=0.24, le=30.0)
    """How long a quiet run after speech ends a chunk."""
    guard_pause_s: float = Field(0.4, ge=0.0, le=5.0)
    """The longest pause kept at a chunk's end and between chunks."""
    guard_too_short: bool = True
    """An end-of-speech sooner than a third of the time the chunk's text takes at a slow speaking rate (an end
    at frame 0 included) is generated again once with the request's next seed; the longer take is kept."""
    guard_hold_s: float = Field(3.0, ge=0.0, le=30.0)
    """How long a later chunk's start is held back so that a too-early end can be retried unheard."""
    guard_first_chunk_hold_s: float = Field(0.0, ge=0.0, le=10.0)
    """How long the first chunk is held back (at least its first group); each 80 ms more is 80 ms more first
    audio."""

    # Overload and hostile input.
    max_queued_requests: int = Field(16, ge=0, le=200)
    """Requests that may wait while MAX_BATCH_SIZE generate; beyond that a request gets 429 with
    `Retry-After`, before any audio."""
    max_request_bytes: int = Field(256 * 1024, ge=1024)
    """The largest request body; bigger gets 413 (4,096 characters of input are at most ~50 KB of JSON)."""
    mlx_memory_limit_mb: int = Field(0, ge=0)
    """MLX memory the model replica may use (`0`: no limit beyond the machine's). A request that pushes it past
    the limit fails with 503 `out_of_memory`, MLX's cache is released, and the next request runs normally."""
    idle_unload_s: float = Field(0.0, ge=0.0)
    """After this many seconds without a request the model replica releases its weights; the next request
    reloads them first and waits for it. `0`: never."""
    worker_stall_timeout_s: float = Field(300.0, ge=1.0)
    """The model replica's MLX thread counts as hung when one task runs longer than this: its health check
    fails and Serve replaces the replica. Loading (and a first download) is exempt."""

    # Custom voices.
    custom_voices: bool = True
    """Whether clients may create custom voices (403 `custom_voices_disabled` when off). Stored voices keep
    speaking and can be deleted either way."""
    max_custom_voices: int = Field(50, ge=1, le=10_000)
    """At most this many custom voices, and this many consents, are stored."""
    custom_voice_max_s: float = Field(30.0, ge=2.0, le=100.0)
    """The longest voice sample (and consent recording) accepted; longer gets 400 `audio_too_long`. A 30 s
    clip takes ~400 of CSM's 2,048 positions."""

    # Presets and ffmpeg.
    voices_dir: Path = PROJECT_ROOT / "voices"
    """The voice preset folder (read at start: restart after adding or changing a preset)."""
    ffmpeg_path: str = "ffmpeg"
    """The ffmpeg binary."""
    ffmpeg_warm: int = Field(1, ge=0, le=4)
    """Idle ffmpeg processes kept started per output format in use, so a response's first byte does not wait
    ~55 ms for ffmpeg to start; `0`: one started per response."""

    @property
    def pid_file(self) -> Path:
        """The service supervisor's PID file, held under a lock while it runs (service.PidLock)."""
        return self.cache_dir / "server.pid"

    @property
    def drain_flag(self) -> Path:
        """Present while the service is stopping: new speech requests get 503, in-flight ones finish."""
        return self.cache_dir / "draining"

    @field_validator("allowed_hosts", "cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, value):
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("api_key", "hf_token", mode="before")
    @classmethod
    def _not_blank(cls, value):
        """`API_KEY=` in .env would otherwise read as "no key" on one side and "a blank key" on another."""
        if isinstance(value, str) and not value.strip():
            raise ValueError("is set but empty: give a value, or unset it")
        return value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        """An IP address or a host name: the control script and the service files use it verbatim."""
        value = value.strip()
        try:
            ipaddress.ip_address(value)
            return value
        except ValueError:
            pass
        if not _HOST_NAME.fullmatch(value):
            raise ValueError("must be an IP address (0.0.0.0, 127.0.0.1, ::) or a host name")
        return value

    @field_validator("cache_dir", "voices_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return Path(os.path.expandvars(str(value))).expanduser()

    @field_validator("model_replicas", mode="before")
    @classmethod
    def _replicas(cls, value):
        text = str(value).strip().lower()
        if text != "auto" and not (text.isdigit() and 1 <= int(text) <= 256):
            raise ValueError("must be a number of replicas (1-256) or 'auto'")
        return text

    @field_validator("quantize", mode="before")
    @classmethod
    def _bits(cls, value):
        """QUANTIZE comes from the environment as text: "8", "4", or "0"/"off"/"" for none."""
        if isinstance(value, str):
            value = value.strip().lower()
            return 0 if value in ("", "0", "off", "none", "false") else int(value) if value.isdigit() else value
        return value

    @field_validator("mlx_compile", mode="before")
    @classmethod
    def _switch(cls, value):
        if isinstance(value, bool) or isinstance(value, str) and value.strip().lower() in ("1", "true", "0", "false"):
            return "on" if str(value).strip().lower() in ("1", "true") else "off"
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level", "default_format", "dtype", "mlx_device", "mimi_dtype", mode="before")
    @classmethod
    def _lower(cls, value):
        return value.lower() if isinstance(value, str) else value

    @classmethod
    def load(cls, environ: Optional[Mapping[str, str]] = None, env_file: Optional[Path] = None) -> Settings:
        """Read settings from `env_file` (default: `.env` in the working directory, else the project root)
        overlaid with `environ` (default: the process environment)."""
        chosen = {name.lower(): value for name, value in cls.given(environ, env_file).items()}
        try:
            return cls(**chosen)
        except ValidationError as exc:
            problems = [
                f"{'.'.join(str(p) for p in err['loc']).upper()}={err.get('input')!r}: {err['msg']}"
                for err in exc.errors()
            ]
            raise ConfigError("invalid settings: " + "; ".join(problems)) from None

    @classmethod
    def given(cls, environ: Optional[Mapping[str, str]] = None, env_file: Optional[Path] = None) -> dict[str, str]:
        """The settings set in `env_file` and `environ` (the environment wins), by variable name, as text."""
        environ = os.environ if environ is None else environ
        values: dict[str, str] = {}
        path = env_file or find_env_file(environ)
        if path is not None:
            values.update({k: v for k, v in dotenv_values(path).items() if v is not None})
        values.update(environ)
        for old, new in RENAMED_SETTINGS.items():  # an older .env keeps working
            if old in values and new not in values:
                values[new] = values[old]
        names = {name.upper() for name in cls.model_fields}
        return {key: value for key, value in values.items() if key in names}

    def without_secrets(self) -> Settings:
        """A copy to hand to Ray (the replicas' `.bind()` arguments are stored and shipped by Ray): no secret,
        only where to read them (`with_secrets`)."""
        return self.model_copy(update={name.lower(): None for name in SECRET_SETTINGS})

    def with_secrets(self) -> Settings:
        """In a replica: the secrets from SECRETS_FILE, if there is one on this machine, else from this
        process's environment and .env (a node of a cluster that has its own)."""
        if any(getattr(self, name.lower()) is not None for name in SECRET_SETTINGS):
            return self
        values = self.given()
        if self.secrets_file is not None and self.secrets_file.is_file():
            stored = dotenv_values(self.secrets_file, interpolate=False)  # a key may hold "$" or "${...}"
            values.update({k: v for k, v in stored.items() if v is not None})
        found = {name.lower(): values[name] for name in SECRET_SETTINGS if values.get(name)}
        return self.model_copy(update={k: SecretStr(v) for k, v in found.items()}) if found else self

    def public_dict(self) -> dict:
        """The settings safe to log: secrets are masked."""
        data = self.model_dump(mode="json")
        data["hf_token"] = "***" if self.hf_token else None
        data["api_key"] = "***" if self.api_key else None
        return data


def find_env_file(environ: Mapping[str, str]) -> Optional[Path]:
    """ENV_FILE if set, else the first `.env` in the working directory or the project root."""
    if environ.get("ENV_FILE"):
        path = Path(environ["ENV_FILE"]).expanduser()
        if not path.is_file():
            raise ConfigError(f"ENV_FILE={path}: no such file")
        return path
    for folder in (Path.cwd(), PROJECT_ROOT):
        candidate = folder / ".env"
        if candidate.is_file():
            return candidate
    return None
