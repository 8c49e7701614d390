"""Finding and loading a CSM checkpoint: a hub repo id or a local directory.

On-disk layout (the real mlx-community conversions, and what `serve_app.tools.tiny_checkpoint` writes):

    config.json            CSM config: model_type "sesame" with flavours, or transformers-style dimensions
    *.safetensors          CSM weights ("model.*" or original key names; optional "quantization" in config)
    tokenizer.json         Llama 3.2 text tokenizer (+ tokenizer_config.json naming bos/eos)   [optional]
    mimi/*.safetensors     Mimi codec weights in kyutai's PyTorch key layout (+ mimi/config.json) [optional]
    prompts/*.wav, *.txt   reference audio for voice presets

A local directory must hold every piece (it never touches the network). For a hub id the repo is fetched
once into CACHE_DIR and later loads run offline; the pieces the repo lacks (tokenizer, Mimi) are fetched
from TOKENIZER_ID and MIMI_ID, never from a hard-coded repo. mlx-audio's `sesame.Model` hard-codes three
hub calls, so we build `SesameModel` and `Mimi` ourselves and only reuse their math.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

from serve_app.core.constants import LOGGER_NAME
from serve_app.core.errors import ModelLoadError
from serve_app.engine.hub import DownloadProgress, fetch_repo
from serve_app.engine.options import EngineOptions

logger = logging.getLogger(LOGGER_NAME)

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
MODEL_FILES = ["config.json", "*.safetensors", "prompts/*", "mimi/*", *TOKENIZER_FILES]
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


@dataclass(frozen=True)
class CheckpointFiles:
    """Where every piece of one checkpoint lies on disk."""

    root: Path
    config: dict
    weights: list[Path]
    tokenizer_dir: Path
    mimi_weights: Path
    mimi_config: Optional[dict]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None


def _layout(root: Path, tokenizer_dir: Optional[Path] = None, mimi_weights: Optional[Path] = None) -> CheckpointFiles:
    """The files of a checkpoint folder; pieces fetched elsewhere may be passed in."""
    config_path = root / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{root}: no config.json (is MODEL_ID a CSM checkpoint folder?)")
    config = _read_json(config_path)
    weights = sorted(root.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(f"{root}: no *.safetensors weights next to config.json")
    if tokenizer_dir is None:
        if not (root / "tokenizer.json").is_file():
            raise ModelLoadError(
                f"{root}: no tokenizer.json. A local checkpoint must hold the Llama 3.2 tokenizer files "
                f"({', '.join(TOKENIZER_FILES)}) next to config.json."
            )
        tokenizer_dir = root
    mimi_config = None
    if mimi_weights is None:
        found = sorted((root / "mimi").glob("*.safetensors"))
        if not found:
            raise ModelLoadError(
                f"{root}: no mimi/*.safetensors. A local checkpoint must hold the Mimi codec weights "
                "(kyutai/moshiko-pytorch-bf16, tokenizer-e351c8d8-checkpoint125.safetensors) in mimi/."
            )
        mimi_weights = found[0]
        if (root / "mimi" / "config.json").is_file():
            mimi_config = _read_json(root / "mimi" / "config.json")
    return CheckpointFiles(root, config, weights, tokenizer_dir, mimi_weights, mimi_config)


def is_local(model_id: str) -> bool:
    return model_id.startswith(("/", ".", "~")) or Path(model_id).expanduser().exists()


def resolve_checkpoint(options: EngineOptions, progress: Optional[DownloadProgress] = None) -> CheckpointFiles:
    """Locate (and on first use of a hub id, download) every file of the configured checkpoint."""
    if is_local(options.model_id):
        root = Path(options.model_id).expanduser().resolve()
        if not root.is_dir():
            raise ModelLoadError(f"MODEL_ID={options.model_id}: no such directory")
        return _layout(root)
    root = fetch_repo(options.model_id, options, MODEL_FILES, progress)
    tokenizer_dir = None
    if not (root / "tokenizer.json").is_file():
        tokenizer_dir = fetch_repo(options.tokenizer_id, options, TOKENIZER_FILES, progress)
    mimi_weights = None
    if not any((root / "mimi").glob("*.safetensors")):
        mimi_weights = fetch_repo(options.mimi_id, options, [options.mimi_file], progress) / options.mimi_file
    return _layout(root, tokenizer_dir, mimi_weights)


class TextTokenizer:
    """The Llama 3.2 tokenizer with CSM's template: BOS text EOS (read with `tokenizers`, no transformers)."""

    def __init__(self, folder: Path):
        path = folder / "tokenizer.json"
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise ModelLoadError(f"cannot read tokenizer {path}: {exc}") from None
        config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        bos = _token_text(config.get("bos_token")) or "<|begin_of_text|>"
        eos = _token_text(config.get("eos_token")) or "<|end_of_text|>"
        ids = [self._tok.token_to_id(t) for t in (bos, eos)]
        if None in ids:
            raise ModelLoadError(f"tokenizer {path}: special tokens {bos!r}/{eos!r} are not in its vocabulary")
        self._tok.post_processor = TemplateProcessing(
            single=f"{bos}:0 $A:0 {eos}:0", special_tokens=[(bos, ids[0]), (eos, ids[1])]
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids


def _token_text(value) -> Optional[str]:
    return value.get("content") if isinstance(value, dict) else value


def load_csm(files: CheckpointFiles, dtype: str):
    """Build mlx-audio's SesameModel from the config and load the weights (strictly)."""
    from mlx_audio.tts.models.sesame.sesame import Model, SesameModel

    try:
        model = SesameModel(files.config)
    except Exception as exc:
        raise ModelLoadError(f"{files.root / 'config.json'}: not a CSM config: {type(exc).__name__}: {exc}") from None
    weights: dict[str, mx.array] = {}
    for path in files.weights:
        try:
            weights.update(mx.load(str(path)))
        except Exception as exc:
            raise ModelLoadError(f"cannot read weights {path}: {exc}") from None
    # Model.sanitize only renames keys (original Sesame names to mlx-audio's) and never touches `self`.
    weights = {k.removeprefix("model."): v for k, v in Model.sanitize(None, weights).items()}
    quant = files.config.get("quantization")
    if quant:
        nn.quantize(
            model,
            group_size=quant["group_size"],
            bits=quant["bits"],
            class_predicate=lambda p, m: f"{p}.scales" in weights,
        )
    target = DTYPES[dtype]
    weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise ModelLoadError(f"weights {', '.join(map(str, files.weights))} do not fit config.json: {exc}") from None
    mx.eval(model.parameters())
    return model


def quantize(model, bits: int, group_size: int = 64) -> None:
    """Quantize the backbone, decoder, projection, heads and embeddings in place (QUANTIZE=8|4).

    Layers whose input width is not a multiple of the group size (only in tiny checkpoints) stay as they
    are; `audio_head` is a plain array, not a layer, so it keeps the model's dtype."""

    def fits(path, module) -> bool:
        return isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=fits)
    mx.eval(model.parameters())


def mimi_config_from_dict(data: dict):
    from mlx_audio.codec.models.mimi.mimi import MimiConfig
    from mlx_audio.codec.models.mimi.modules import SeanetConfig, TransformerConfig

    fields = {f.name for f in dataclasses.fields(MimiConfig)}
    rest = {k: v for k, v in data.items() if k in fields and k not in ("seanet", "transformer")}
    return MimiConfig(
        seanet=SeanetConfig(**data["seanet"]), transformer=TransformerConfig(**data["transformer"]), **rest
    )


def load_mimi(files: CheckpointFiles, dtype: str = "float32"):
    """Mimi from kyutai-layout weights through mlx-audio's own converter (`load_pytorch_weights`), in `dtype`.

    Sesame's reference loads kyutai's bf16 checkpoint into a float32 Mimi; run in bf16 (codebook tables
    included) ~15% of a prompt's codes differed and the decode had 36 dB SNR against float32. mlx-audio
    keeps tables derived from the weights (codebook embeddings, expanded conv weights), rebuilt here after
    the cast so they follow it."""
    from mlx_audio.codec.models.mimi.mimi import Mimi, mimi_202407

    try:
        cfg = mimi_config_from_dict(files.mimi_config) if files.mimi_config else mimi_202407(32)
    except (KeyError, TypeError) as exc:
        raise ModelLoadError(f"{files.mimi_weights.parent / 'config.json'}: not a Mimi config: {exc}") from None
    mimi = Mimi(cfg)
    try:
        mimi.load_pytorch_weights(str(files.mimi_weights), strict=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load Mimi weights {files.mimi_weights}: {exc}") from None
    mimi.set_dtype(DTYPES[dtype])
    for _, module in mimi.named_modules():
        if hasattr(module, "update_in_place"):
            module.update_in_place()
    mimi.eval()
    mx.eval(mimi.parameters())
    return mimi
