"""Checkpoint resolution and loading: a local folder, a hub id served from the cache, and broken ones (the tiny
checkpoint as the tool writes it by default: CSM's 32 codebooks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from serve_app.core.errors import ModelLoadError
from serve_app.core.settings import Settings
from serve_app.engine.checkpoint import TextTokenizer, load_csm, load_mimi, resolve_checkpoint
from serve_app.tools.tiny_checkpoint import MIMI_FILE


def settings(model_id, **kw) -> Settings:
    return Settings(model_id=str(model_id), **kw)


def test_local_folder_resolves_every_piece(csm_tiny_checkpoint):
    files = resolve_checkpoint(settings(csm_tiny_checkpoint))
    assert files.root == csm_tiny_checkpoint.resolve()
    assert [p.name for p in files.weights] == ["model.safetensors"]
    assert files.tokenizer_dir == files.root
    assert files.mimi_weights.name == MIMI_FILE and files.mimi_config["quantizer_nq"] == 32


def test_tokenizer_wraps_text_in_bos_and_eos(csm_tiny_checkpoint):
    tok = TextTokenizer(csm_tiny_checkpoint)
    ids = tok.encode("[0]Hello there")
    assert ids[0] == tok._tok.token_to_id("<|begin_of_text|>")
    assert ids[-1] == tok._tok.token_to_id("<|end_of_text|>")
    assert len(tok.encode("[0]😀 你好")) > 4  # byte-level: nothing is unknown


def _hub_repo(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay files out as huggingface_hub's cache does: models--org--name/{refs/main,snapshots/<sha>/...}."""
    base = cache / "hub" / f"models--{repo_id.replace('/', '--')}"
    sha = "0" * 40
    snapshot = base / "snapshots" / sha
    for rel, src in files.items():
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, snapshot / rel)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(sha)
    return snapshot


def test_hub_id_loads_from_cache_without_network(csm_tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    everything = {str(p.relative_to(csm_tiny_checkpoint)): p for p in csm_tiny_checkpoint.rglob("*") if p.is_file()}
    snapshot = _hub_repo(tmp_path, "test-org/csm-tiny", everything)
    s = settings("test-org/csm-tiny", cache_dir=tmp_path)
    files = resolve_checkpoint(s)
    assert files.root == snapshot
    model = load_csm(files, "bfloat16")
    # Every tensor of the file landed in the model, in bf16 (the file holds float32).
    stored = mx.load(str(snapshot / "model.safetensors"))
    loaded = dict(tree_flatten(model.parameters()))
    assert set(loaded) == {k.removeprefix("model.") for k in stored}
    for key, value in stored.items():
        param = loaded[key.removeprefix("model.")]
        assert param.dtype == mx.bfloat16 and param.shape == value.shape
        assert mx.array_equal(param, value.astype(mx.bfloat16)).item(), key
    mimi = load_mimi(files)
    assert mimi.cfg.quantizer_nq == model.args.audio_num_codebooks == 32
    assert mimi.cfg.seanet.dimension == files.mimi_config["seanet"]["dimension"]  # the tiny codec, not the real one
    codes = mimi.encode(mx.zeros((1, 1, 1920 * 4)))
    assert codes.shape == (1, 32, 4)  # 4 frames of 80 ms, one code per codebook


def test_hub_id_fetches_tokenizer_and_mimi_from_their_own_repos(csm_tiny_checkpoint, tmp_path, monkeypatch):
    """The mlx-community layout: config, weights and prompts only; the rest comes from TOKENIZER_ID/MIMI_ID."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_files = {
        n: csm_tiny_checkpoint / n for n in ["config.json", "model.safetensors", "prompts/conversational_a.wav"]
    }
    _hub_repo(tmp_path, "test-org/csm", model_files)
    tok = _hub_repo(
        tmp_path,
        "test-org/tokenizer",
        {n: csm_tiny_checkpoint / n for n in ["tokenizer.json", "tokenizer_config.json"]},
    )
    mimi = _hub_repo(tmp_path, "test-org/mimi", {MIMI_FILE: csm_tiny_checkpoint / "mimi" / MIMI_FILE})
    s = settings("test-org/csm", cache_dir=tmp_path, tokenizer_id="test-org/tokenizer", mimi_id="test-org/mimi")
    files = resolve_checkpoint(s)
    assert files.tokenizer_dir == tok
    assert files.mimi_weights == mimi / MIMI_FILE
    assert files.mimi_config is None  # the real Mimi config (mimi_202407) applies


def test_uncached_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="cannot download test-org/absent"):
        resolve_checkpoint(settings("test-org/absent", cache_dir=tmp_path))


@pytest.fixture
def broken(csm_tiny_checkpoint, tmp_path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(csm_tiny_checkpoint, copy)
    return copy


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        resolve_checkpoint(settings(tmp_path / "nope"))


@pytest.mark.parametrize(
    "remove,words",
    [
        ("config.json", "no config.json"),
        ("model.safetensors", "no *.safetensors"),
        ("tokenizer.json", "no tokenizer.json"),
        ("mimi", "no mimi/*.safetensors"),
    ],
)
def test_local_folder_missing_a_piece(broken, remove, words):
    target = broken / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ModelLoadError, match=words.replace("*", r"\*")):
        resolve_checkpoint(settings(broken))


def test_truncated_weights_name_the_file(broken):
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    with pytest.raises(ModelLoadError, match="cannot read weights .*model.safetensors"):
        load_csm(resolve_checkpoint(settings(broken)), "bfloat16")


def test_weights_that_do_not_fit_the_config(broken):
    config = json.loads((broken / "config.json").read_text())
    config["hidden_size"] = 96
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="do not fit config.json"):
        load_csm(resolve_checkpoint(settings(broken)), "bfloat16")


def test_corrupt_config(broken):
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_checkpoint(settings(broken))


def test_corrupt_mimi(broken):
    (broken / "mimi" / MIMI_FILE).write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="Mimi weights"):
        load_mimi(resolve_checkpoint(settings(broken)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mimi_runs_in_the_chosen_dtype_tables_included(csm_tiny_checkpoint, dtype):
    """MIMI_DTYPE reaches every array, also the tables mlx-audio derives from the weights (codebook
    embeddings, expanded conv weights), and the codec still encodes and decodes."""
    mimi = load_mimi(resolve_checkpoint(settings(csm_tiny_checkpoint)), dtype)
    found = {v.dtype for _, module in mimi.named_modules() for v in module.values() if isinstance(v, mx.array)}
    assert found == {getattr(mx, dtype)}
    codes = mimi.encode(mx.array(np.sin(np.arange(1920 * 3) / 9.0).astype(np.float32))[None, None])
    assert codes.shape == (1, 32, 3) and int(codes.max()) < 2048
    assert mimi.decode(codes).shape[-1] == 1920 * 3
