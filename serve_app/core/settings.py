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

    model_config = ConfigDict(extra="ignore", frozen=True, validate_default=True)

    # The brief's R7 settings.
    host: str = "0.0.0.0"
    port: int = Field(8880, ge=1, le=65535)
    model_id: str = Field("mlx-community/csm-1b", min_length=1)
    cache_dir: Path = Path("~/.cache/sesame-tts")
    default_voice: str = "conversational"
    default_format: ResponseFormat = "mp3"
    max_input_length: int = Field(4096, ge=1, le=100_000)
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"

    # When set, speech (and every other /v1 call but the lists) needs `Authorization: Bearer <API_KEY>`;
    # /health stays open.
    api_key: Optional[SecretStr] = None
    # Whether the lists (/v1/models, /v1/audio/models, /v1/audio/voices) need the key too. Off by default:
    # Open WebUI and similar clients fetch them without a key and silently fall back to OpenAI's names,
    # and they reveal only the model and preset names.
    lists_need_api_key: bool = False
    # Host names this server answers to besides its own names and addresses (DNS rebinding guard), comma-
    # separated: a reverse proxy's public name, say; "*" turns the check off.
    allowed_hosts: tuple[str, ...] = ()
    # Browser origins (scheme://host[:port]) allowed to make state-changing requests and read responses
    # (CORS), comma-separated; "*": any. Requests without an Origin (SDKs, curl) are not affected.
    cors_origins: tuple[str, ...] = ()
    # A request's body must arrive within BODY_TIMEOUT_S plus its length at BODY_MIN_RATE bytes/s (408).
    body_timeout_s: float = Field(10.0, ge=1.0, le=600.0)
    body_min_rate: int = Field(64 * 1024, ge=1024)
    # A response the client takes no bytes of for WRITE_TIMEOUT_S ends: Serve's proxy resets the connection
    # and cancels the request (api/proxy.py), so a reader that stops cannot pin the response's memory.
    write_timeout_s: float = Field(30.0, ge=1.0, le=3600.0)

    # The model.
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    mlx_device: Literal["auto", "cpu", "gpu"] = "auto"
    # The Mimi codec's dtype. float32 is how Sesame's reference runs it (kyutai's bf16 weights in a float32
    # model); bfloat16 halves its memory (~0.2 GB) and decodes faster on this CPU, with slightly different codes.
    mimi_dtype: Literal["float32", "bfloat16"] = "float32"
    # Weight quantization at load (0 = off): less memory and, on Apple GPUs, less bandwidth per frame.
    quantize: Literal[0, 4, 8] = 0
    # Compile the whole frame (engine/frame.py) once per shape (rows generating, rows joining, cache capacity
    # bucket) and Mimi's codebook decode per batch size. "auto": on a GPU only; MLX's CPU backend compiles
    # with a C++ compiler (~30 s per new shape, cold) for a few % at full size.
    mlx_compile: Literal["auto", "on", "off"] = "auto"
    # Pipelined frame loop: launch frame N+1 before reading frame N on the host (same output; off for checks).
    pipeline: bool = True
    # Model replicas, at most one per machine (Ray node): a number, or "auto" for one on every node of the Ray
    # cluster that can run MLX (the nodes started with the custom resource {"mlx": 1}; all nodes if none is).
    # Counted when the app is deployed: after adding a machine, restart (or redeploy) the app.
    model_replicas: str = "1"
    # Requests generating together in one batched forward pass; more wait (up to MAX_QUEUED_REQUESTS).
    max_batch_size: int = Field(8, ge=1, le=64)
    hf_token: Optional[SecretStr] = None
    # Where the replicas read API_KEY and HF_TOKEN (a 0600 file the launcher writes into CACHE_DIR), so the
    # secrets never travel in the app's arguments or runtime_env, which Ray stores and logs. Set by the launcher.
    secrets_file: Optional[Path] = None
    # The hub's address (a mirror, say); None: huggingface_hub's default.
    hf_endpoint: Optional[str] = None
    # Where a hub checkpoint's missing pieces are fetched from (a local MODEL_ID never fetches).
    tokenizer_id: str = "unsloth/Llama-3.2-1B"
    mimi_id: str = "kyutai/moshiko-pytorch-bf16"
    mimi_file: str = "tokenizer-e351c8d8-checkpoint125.safetensors"

    # Text ready to speak: markdown (emphasis, headings, lists, links, code blocks, tables) and emoji are taken
    # out before chunking (markdown.py); MAX_INPUT_LENGTH applies to the text as sent.
    strip_markdown: bool = True

    # Text chunking: the first chunk is short so speech starts early.
    first_chunk_max_chars: int = Field(100, ge=20)
    chunk_max_chars: int = Field(220, ge=20, le=1000)

    # Backbone KV reuse: a voice's reference clip is prefilled once at load and requests start from it; a
    # request's next text chunk continues its own cache row instead of re-prefilling voice and history.
    # Off: every chunk re-prefills its whole context (the reference behaviour, for comparisons).
    prefix_cache: bool = True
    # The voices' cached prefixes may hold this much memory (least recently used out first). A prefix costs
    # ~32 KB per position with CSM-1B in bf16 (16 layers x 8 KV heads x 64 dims x keys and values).
    voice_cache_mb: int = Field(512, ge=0)

    # Conversation context across requests (text/memory.py): what each response said (its text and Mimi codes,
    # ~48 KB per minute of speech) is kept under its request id in this much memory (0: off), least recently
    # used out first, for at most UTTERANCE_MAX_AGE_S; a `conversation` keeps its last CONVERSATION_TURNS turns
    # for CONVERSATION_MAX_AGE_S after its latest one.
    utterance_memory_mb: float = Field(64.0, ge=0.0)
    utterance_max_age_s: float = Field(3600.0, gt=0.0)
    conversation_turns: int = Field(3, ge=1, le=16)
    conversation_max_age_s: float = Field(1800.0, gt=0.0)

    # While other requests stream, a joining prompt is prefilled at most this many positions per batch step
    # (between their frames), so a long context never stalls them for long.
    prefill_step_positions: int = Field(128, ge=8, le=2048)

    # Streaming: frames decoded per PCM group; the first group is small for a fast first byte.
    first_group_frames: int = Field(2, ge=1, le=50)
    group_frames: int = Field(6, ge=1, le=100)

    # Runaway guard: a text chunk may produce at most base + per_char * len(text) seconds of audio. The default
    # allows the text at a slow speaking rate (10 characters a second) plus 2 s: 22 s for 200 characters. The
    # cap before guards existed: MAX_AUDIO_S_PER_CHAR=0.12 (26 s for 200 characters).
    max_audio_base_s: float = Field(2.0, ge=0.08)
    max_audio_s_per_char: float = Field(round(1.0 / SLOW_CHARS_PER_S, 4), ge=0.0)

    # Guards against CSM's known failure modes (engine/guards.py, README "Guards"); each off with its setting.
    # Every chunk ends with terminal punctuation before it reaches CSM (a chunk without one tends to lose its
    # last word).
    terminal_punctuation: bool = True
    # A chunk whose codebook-0 codes repeat over GUARD_LOOP_WINDOW_S ends there.
    guard_loop: bool = True
    guard_loop_window_s: float = Field(2.0, ge=0.4, le=10.0)
    # Once a chunk has spoken, a quiet run (each 80 ms frame's RMS below GUARD_SILENCE_DBFS) of
    # GUARD_SILENT_TAIL_S ends it, and only GUARD_PAUSE_S of that run is kept; the pause between two chunks
    # (one's trailing quiet frames and the next one's leading ones) is also kept to at most GUARD_PAUSE_S.
    guard_silent_tail: bool = True
    guard_silence_dbfs: float = Field(-45.0, ge=-120.0, le=0.0)
    guard_silent_tail_s: float = Field(1.5, ge=0.24, le=30.0)
    guard_pause_s: float = Field(0.4, ge=0.0, le=5.0)
    # An end-of-speech sooner than a third of the time the chunk's text takes at a slow speaking rate (an end
    # at frame 0 included) is generated again once with the request's next seed; the longer take is kept.
    # To allow the retry, a chunk's audio is held back until it passes that point or GUARD_HOLD_S, whichever
    # comes first (an end after that is kept: its audio is playing); the first chunk holds at most its first
    # group, or GUARD_FIRST_CHUNK_HOLD_S when that is longer (each 80 ms held there is 80 ms more first audio).
    guard_too_short: bool = True
    guard_hold_s: float = Field(3.0, ge=0.0, le=30.0)
    guard_first_chunk_hold_s: float = Field(0.0, ge=0.0, le=10.0)

    # Overload and hostile input. Up to MAX_BATCH_SIZE requests generate together; up to
    # MAX_QUEUED_REQUESTS more wait, and beyond that a request gets 429 with Retry-After before any audio.
    max_queued_requests: int = Field(16, ge=0, le=200)
    # Request bodies over this many bytes get 413 (4,096 characters of input are at most ~50 KB of JSON).
    max_request_bytes: int = Field(256 * 1024, ge=1024)
    # MLX memory the model replica may use (MB, 0 = no limit beyond the machine's). A request that would
    # pass it fails with 503 out_of_memory and the replica releases MLX's cache; the others carry on.
    mlx_memory_limit_mb: int = Field(0, ge=0)
    # Release the model's weights (memory back to the OS) after this many seconds without a request; the next
    # request reloads them first (see README "Idle unload" for the time that takes). 0: never.
    idle_unload_s: float = Field(0.0, ge=0.0)
    # The model replica's MLX thread is taken as hung when one task (a batch step, a call) runs longer than
    # this; Serve's health check then fails and Serve replaces the replica. A step takes milliseconds on a
    # GPU; a long prefill with full-size weights on a slow CPU can take minutes. Loading is exempt.
    worker_stall_timeout_s: float = Field(300.0, ge=1.0)

    # Custom voices (POST /v1/audio/voice_consents, /v1/audio/voices): stored under CACHE_DIR. Off: no new
    # consents or voices (stored ones still speak and can be deleted).
    custom_voices: bool = True
    # At most this many custom voices, and this many consents, are kept.
    max_custom_voices: int = Field(50, ge=1, le=10_000)
    # The longest reference clip accepted. Its frames share CSM's 2,048 positions with the longest text chunk
    # and the conversation; a 30 s clip takes ~400 (the model replica checks the exact fit).
    custom_voice_max_s: float = Field(30.0, ge=2.0, le=100.0)

    # Presets and ffmpeg.
    voices_dir: Path = PROJECT_ROOT / "voices"
    ffmpeg_path: str = "ffmpeg"
    # Idle ffmpeg processes kept started per output format in use (0: start one per response): ffmpeg takes
    # ~55 ms to start, which a response's first byte would otherwise wait for.
    ffmpeg_warm: int = Field(1, ge=0, le=4)

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
