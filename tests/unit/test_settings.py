"""Settings: defaults, .env with environment precedence, validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.core.settings import ConfigError, Settings


def test_defaults_match_the_brief(tmp_path):
    s = Settings.load({}, env_file=_empty(tmp_path))
    assert (s.host, s.port, s.default_voice, s.default_format, s.max_input_length, s.log_level) == (
        "0.0.0.0",
        8880,
        "conversational",
        "mp3",
        4096,
        "info",
    )
    assert s.model_id == "mlx-community/csm-1b"
    assert s.cache_dir == Path("~/.cache/sesame-tts").expanduser()
    assert s.dtype == "bfloat16"


def _empty(tmp_path) -> Path:
    path = tmp_path / "empty.env"
    path.write_text("")
    return path


def test_env_file_and_environment_precedence(tmp_path):
    env = tmp_path / ".env"
    env.write_text("PORT=9000\nDEFAULT_FORMAT=WAV\nLOG_LEVEL=DEBUG\nHF_TOKEN=hf_secret\nUNRELATED=1\n")
    s = Settings.load({"PORT": "9100"}, env_file=env)
    assert s.port == 9100  # the environment wins over .env
    assert s.default_format == "wav" and s.log_level == "debug"
    assert s.hf_token.get_secret_value() == "hf_secret"
    assert "hf_secret" not in repr(s) and s.public_dict()["hf_token"] == "***"


def test_env_file_variable(tmp_path):
    env = tmp_path / "custom.env"
    env.write_text("MAX_INPUT_LENGTH=100\n")
    assert Settings.load({"ENV_FILE": str(env)}).max_input_length == 100
    with pytest.raises(ConfigError, match="ENV_FILE"):
        Settings.load({"ENV_FILE": str(tmp_path / "missing.env")})


@pytest.mark.parametrize(
    "key,value,words",
    [
        ("PORT", "eighty", "PORT='eighty'"),
        ("PORT", "70000", "PORT='70000'"),
        ("DEFAULT_FORMAT", "ogg", "DEFAULT_FORMAT='ogg'"),
        ("MAX_INPUT_LENGTH", "0", "MAX_INPUT_LENGTH"),
        ("LOG_LEVEL", "loud", "LOG_LEVEL"),
        ("DTYPE", "int4", "DTYPE"),
    ],
)
def test_invalid_values_name_the_variable(tmp_path, key, value, words):
    with pytest.raises(ConfigError) as info:
        Settings.load({key: value}, env_file=_empty(tmp_path))
    assert words in str(info.value)


def test_default_voice_must_exist(tmp_path):
    from serve_app.app import build_application

    settings = Settings.load({"DEFAULT_VOICE": "nobody"}, env_file=_empty(tmp_path))
    with pytest.raises(Exception, match="nobody"):
        build_application(settings)
