"""Voice presets: the shipped ones, adding one by file, and start-up errors naming file and field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from serve_app.core.constants import PROJECT_ROOT
from serve_app.core.errors import InvalidRequestError
from serve_app.core.settings import ConfigError
from serve_app.voices.presets import VoiceLibrary

VOICES = PROJECT_ROOT / "voices"
OPENAI_VOICES = [
    "alloy",
    "ash",
    "ballad",
    "coral",
    "echo",
    "fable",
    "onyx",
    "nova",
    "sage",
    "shimmer",
    "verse",
    "marin",
    "cedar",
]


def test_shipped_presets_and_aliases():
    lib = VoiceLibrary.load(VOICES)
    assert lib.names() == ["conversational", "fast", "professional", "whisper"]
    assert lib.resolve("conversational").prompt is not None
    assert lib.resolve("fast").prompt is None
    assert lib.resolve("whisper").gain_db < 0
    for name in OPENAI_VOICES:
        assert lib.resolve(name).name in lib.presets
    assert lib.resolve("Alloy").name == lib.resolve("alloy").name


def test_unknown_voice_lists_the_voices():
    with pytest.raises(InvalidRequestError) as info:
        VoiceLibrary.load(VOICES).resolve("../voices/conversational")
    assert info.value.param == "voice" and info.value.status_code == 400
    assert "conversational, fast, professional, whisper" in info.value.message


@pytest.fixture
def voices_copy(tmp_path) -> Path:
    folder = tmp_path / "voices"
    shutil.copytree(VOICES, folder)
    return folder


def test_a_new_file_adds_a_voice(voices_copy):
    (voices_copy / "narrator.json").write_text(
        '{"name": "narrator", "description": "Calm narrator", "temperature": 0.5}'
    )
    lib = VoiceLibrary.load(voices_copy)
    assert lib.resolve("narrator").temperature == 0.5


@pytest.mark.parametrize(
    "content,words",
    [
        ("name: bad\ndescription: x\ntemperature: hot\n", "field 'temperature'"),
        ("name: bad\ndescription: x\ntop_k: 0\n", "field 'top_k'"),
        ("description: no name\n", "field 'name'"),
        ("name: Bad Name\ndescription: x\n", "field 'name'"),
        ("name: bad\ndescription: x\nprompt: {audio: ../../etc/passwd, text: hi}\n", "field 'prompt.audio'"),
        ("name: bad\ndescription: x\nprompt: {audio: /etc/passwd, text: hi}\n", "field 'prompt.audio'"),
        ("name: bad\ndescription: x\nvolume: 11\n", "field 'volume'"),
        ("name: [unclosed\n", "not valid YAML/JSON"),
        ("name: conversational\ndescription: dup\n", "defined twice"),
    ],
)
def test_invalid_file_names_file_and_field(voices_copy, content, words):
    (voices_copy / "zz_bad.yaml").write_text(content)
    with pytest.raises(ConfigError) as info:
        VoiceLibrary.load(voices_copy)
    assert "zz_bad.yaml" in str(info.value)
    assert words in str(info.value)


def test_alias_to_unknown_preset_fails(voices_copy):
    (voices_copy / "aliases.yaml").write_text("alloy: nobody\n")
    with pytest.raises(ConfigError, match="alias file .*aliases.yaml.*'alloy'"):
        VoiceLibrary.load(voices_copy)


def test_prompt_paths_resolve_inside_their_folder(voices_copy, tmp_path):
    checkpoint = tmp_path / "ckpt"
    (checkpoint / "prompts").mkdir(parents=True)
    (checkpoint / "prompts" / "conversational_a.wav").write_bytes(b"RIFF")
    lib = VoiceLibrary.load(voices_copy)
    path = lib.resolve("conversational").prompt.resolve(voices_copy, checkpoint)
    assert path == (checkpoint / "prompts" / "conversational_a.wav").resolve()
    with pytest.raises(ConfigError, match="not found"):
        lib.resolve("professional").prompt.resolve(voices_copy, checkpoint)
    # A symlink that points outside the folder is refused too.
    (voices_copy / "escape.wav").symlink_to("/etc/hostname")
    (voices_copy / "escape.yaml").write_text("name: escape\ndescription: x\nprompt: {audio: escape.wav, text: hi}\n")
    with pytest.raises(ConfigError, match="outside"):
        VoiceLibrary.load(voices_copy).resolve("escape").prompt.resolve(voices_copy, checkpoint)


def test_checkpoint_prompts_in_a_hub_snapshot_resolve_through_its_blob_links(voices_copy, tmp_path):
    """huggingface_hub's cache: snapshots/<commit>/prompts/x.wav is a link to ../../../blobs/<hash>."""
    repo = tmp_path / "hub" / "models--org--csm"
    snapshot = repo / "snapshots" / "abc123"
    (snapshot / "prompts").mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "blobs" / "f00d").write_bytes(b"RIFF")
    (snapshot / "prompts" / "conversational_a.wav").symlink_to("../../../blobs/f00d")
    path = VoiceLibrary.load(voices_copy).resolve("conversational").prompt.resolve(voices_copy, snapshot)
    assert path == (repo / "blobs" / "f00d").resolve()
    (tmp_path / "outside.wav").write_bytes(b"RIFF")  # a link out of the repo's folder is still refused
    (snapshot / "prompts" / "conversational_a.wav").unlink()
    (snapshot / "prompts" / "conversational_a.wav").symlink_to(tmp_path / "outside.wav")
    with pytest.raises(ConfigError, match="outside"):
        VoiceLibrary.load(voices_copy).resolve("conversational").prompt.resolve(voices_copy, snapshot)
