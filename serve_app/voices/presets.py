"""Voice presets: one YAML or JSON file per voice in the voices folder, plus an alias table.

A preset is a set of CSM generation parameters and, optionally, a reference prompt (audio + transcript)
that is given to CSM as context so every request in that voice starts from the same speaker. Adding a
file adds a voice; a broken file stops start-up with a message naming the file and the field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serve_app.core.errors import InvalidRequestError
from serve_app.core.messages import VoiceParams
from serve_app.core.settings import ConfigError

ALIASES_FILE = "aliases.yaml"
CHECKPOINT_PREFIX = "checkpoint:"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class VoicePrompt(BaseModel):
    """Reference audio and its transcript. `audio` is relative to the voices folder, or to the model
    checkpoint when written `checkpoint:prompts/x.wav`; it may not leave either folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    audio: str
    text: str = Field(min_length=1)

    @field_validator("audio")
    @classmethod
    def _relative_inside(cls, value: str) -> str:
        path = Path(value.removeprefix(CHECKPOINT_PREFIX))
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise ValueError("must be a relative path inside the voices folder or the checkpoint")
        return value

    def resolve(self, voices_dir: Path, checkpoint_dir: Path) -> Path:
        """The prompt's audio file; raises ConfigError if it leaves its folder or does not exist."""
        if self.audio.startswith(CHECKPOINT_PREFIX):
            base, relative = checkpoint_dir, self.audio[len(CHECKPOINT_PREFIX) :]
            boundary = _repo_folder(base)
        else:
            base, relative = voices_dir, self.audio
            boundary = base.resolve()
        path = (base / relative).resolve()
        if not path.is_relative_to(boundary):
            raise ConfigError(f"prompt audio {self.audio!r} resolves outside {base}")
        if not path.is_file():
            raise ConfigError(f"prompt audio {self.audio!r} not found (looked for {path})")
        return path


def _repo_folder(checkpoint_dir: Path) -> Path:
    """Where a checkpoint's files may really lie. In huggingface_hub's cache a snapshot's files are links
    into the repo's own blobs/ folder (models--org--name/{snapshots/<commit>, blobs}), so for a snapshot
    the repo's folder is the boundary; for a plain folder, the folder itself."""
    folder = checkpoint_dir.resolve()
    return folder.parent.parent if folder.parent.name == "snapshots" else folder


class VoicePreset(VoiceParams):
    """One voice: what the model needs of it (`VoiceParams`: sampling, speaker id, gain), plus what only the
    voices folder knows: its description and optional reference prompt (`params()` leaves them out)."""

    description: str
    prompt: Optional[VoicePrompt] = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be lower-case letters, digits, '-' or '_' (at most 64)")
        return value


def unknown_voice(name: str, presets: list[str], aliases: list[str], custom: list[str] = ()) -> InvalidRequestError:
    """The 400 for a voice nobody has: it names what there is (the custom voices only when given)."""
    message = f"Voice {name!r} is not available. Available voices: {', '.join(presets)}"
    message += f" (and the aliases {', '.join(aliases)})." if aliases else "."
    if custom:
        message += f" Custom voices: {', '.join(custom)}."
    return InvalidRequestError(message, param="voice", code="invalid_voice")


def _read(path: Path) -> object:
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


class VoiceLibrary:
    """The presets of a voices folder and the alias table that maps other names (OpenAI's) onto them."""

    def __init__(self, presets: dict[str, VoicePreset], aliases: dict[str, str]):
        self.presets = presets
        self.aliases = aliases

    @classmethod
    def load(cls, folder: Path) -> VoiceLibrary:
        if not folder.is_dir():
            raise ConfigError(f"voices folder {folder} does not exist")
        presets: dict[str, VoicePreset] = {}
        for path in sorted(folder.iterdir()):
            if path.suffix not in (".yaml", ".yml", ".json") or path.name == ALIASES_FILE:
                continue
            try:
                preset = VoicePreset.model_validate(_read(path))
            except ValidationError as exc:
                err = exc.errors()[0]
                field = ".".join(str(p) for p in err["loc"]) or "(file)"
                raise ConfigError(f"voice file {path}: field '{field}': {err['msg']}") from None
            except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"voice file {path}: not valid YAML/JSON: {exc}") from None
            if preset.name in presets:
                raise ConfigError(f"voice file {path}: field 'name': '{preset.name}' is defined twice")
            presets[preset.name] = preset
        if not presets:
            raise ConfigError(f"voices folder {folder} holds no voice files")
        aliases = cls._load_aliases(folder / ALIASES_FILE, presets)
        return cls(presets, aliases)

    @staticmethod
    def _load_aliases(path: Path, presets: dict[str, VoicePreset]) -> dict[str, str]:
        if not path.is_file():
            return {}
        data = _read(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"alias file {path}: must map alias names to preset names")
        aliases = {}
        for alias, target in data.items():
            if target not in presets:
                raise ConfigError(f"alias file {path}: field '{alias}': unknown preset {target!r}")
            aliases[str(alias).lower()] = target
        return aliases

    def names(self) -> list[str]:
        return sorted(self.presets)

    def find(self, name: str) -> Optional[VoicePreset]:
        """The preset for a preset name or alias (case-insensitive), or None."""
        key = name.strip().lower()
        return self.presets.get(self.aliases.get(key, key))

    def resolve(self, name: str) -> VoicePreset:
        """The preset for a preset name or alias (case-insensitive); an unknown name is a 400."""
        preset = self.find(name)
        if preset is None:
            raise unknown_voice(name, self.names(), sorted(self.aliases))
        return preset
