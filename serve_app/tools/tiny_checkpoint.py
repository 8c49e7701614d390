"""Write a random-weight CSM checkpoint in the real on-disk layout, for offline tests and benchmarks.

    python -m serve_app.tools.tiny_checkpoint OUT_DIR              # tiny: a test request takes well under a second
    python -m serve_app.tools.tiny_checkpoint OUT_DIR --full-size  # CSM-1B's exact architecture and the real Mimi
    python -m serve_app.tools.tiny_checkpoint OUT_DIR --codebooks 8  # tiny with Moshi's 8 Mimi codebooks, not CSM's 32

The output is loaded through exactly the same code as a downloaded checkpoint (see engine/checkpoint.py):
config.json + model.safetensors, a byte-level BPE tokenizer.json with Llama-3-style BOS/EOS tokens, Mimi
weights written in kyutai's PyTorch key layout (mimi/), and prompt wavs with transcripts (prompts/). Only the
weights and the sizes differ from the real model. Random weights never emit end-of-speech, so every
generation from this checkpoint runs to the server's length cap.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import wave
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
AUDIO_VOCAB = 2051  # sesame/csm-1b's audio_vocab_size
CSM_CODEBOOKS = 32  # the Mimi codebooks CSM-1B samples per frame (Moshi samples 8 of the same Mimi)
PROMPTS = {
    "conversational_a": "Hi there, this is the conversational voice speaking naturally.",
    "conversational_b": "And this is the second speaker, a little brighter and quicker.",
    "read_speech_a": "The quick brown fox jumps over the lazy dog.",
}
_CORPUS = (
    "Hello, this is Max. The quick brown fox jumps over the lazy dog. How are you today? "
    "Speech synthesis turns text into audio, one sentence at a time: numbers like 42 and 3.14 too! "
    "Sesame's conversational speech model sounds natural, warm and clear."
)


def _write_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "model_max_length": 2048,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok.get_vocab_size()


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int) -> dict:
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "intermediate_size": ffn,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000,
        "use_cache": True,
        "rope_scaling": {
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    }


def csm_config(text_vocab: int, full_size: bool, codebooks: int = CSM_CODEBOOKS) -> dict:
    """A transformers-style CSM config; full size is CSM-1B's (llama-1B backbone, llama-100M decoder).
    `codebooks`: the Mimi codebooks a frame samples (CSM's 32; the depth decoder takes one step per codebook)."""
    backbone = _llama(2048, 16, 32, 8, 8192) if full_size else _llama(64, 2, 4, 2, 128)
    decoder = _llama(1024, 4, 8, 2, 8192) if full_size else _llama(32, 1, 2, 1, 64)
    # CSM's real audio vocabulary: Mimi's 2048 codes plus 3 (codebook pad 2050), so random weights also sample
    # codes >= 2048 and the clip before Mimi runs in every test.
    decoder.update(
        model_type="csm_depth_decoder_model",
        num_codebooks=codebooks,
        vocab_size=AUDIO_VOCAB,
        backbone_hidden_size=backbone["hidden_size"],
    )
    return {
        "model_type": "sesame",
        "backbone_flavor": "llama-1B",
        "decoder_flavor": "llama-100M",
        "text_vocab_size": 128256 if full_size else text_vocab,
        "audio_vocab_size": AUDIO_VOCAB,
        "audio_num_codebooks": codebooks,
        "num_codebooks": codebooks,
        "vocab_size": AUDIO_VOCAB,
        "audio_eos_token_id": 0,
        "audio_token_id": 128002,
        "bos_token_id": 128000,
        "codebook_eos_token_id": 0,
        "codebook_pad_token_id": 2050,
        "pad_token_id": 128002,
        "tie_codebooks_embeddings": True,
        "tie_word_embeddings": False,
        **backbone,
        "depth_decoder_config": decoder,
    }


def _write_csm(out: Path, config: dict, dtype) -> None:
    from mlx_audio.tts.models.sesame.sesame import SesameModel

    model = SesameModel(config)
    # mlx-audio initialises the per-codebook heads to zeros; random weights need them random.
    model.audio_head = mx.random.normal(model.audio_head.shape) * (model.audio_head.shape[1] ** -0.5)
    weights = {f"model.{k}": v.astype(dtype) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))


def mimi_config(full_size: bool, codebooks: int = CSM_CODEBOOKS):
    from mlx_audio.codec.models.mimi.mimi import mimi_202407

    cfg = mimi_202407(codebooks)
    if full_size:
        return cfg
    seanet = dataclasses.replace(cfg.seanet, dimension=32, nfilters=4)
    transformer = dataclasses.replace(cfg.transformer, d_model=32, num_heads=2, num_layers=1, dim_feedforward=64)
    return dataclasses.replace(cfg, seanet=seanet, transformer=transformer, quantizer_dim=8)


_ENCODER_BLOCKS = [1, 4, 7, 10]
_DECODER_BLOCKS = [2, 5, 8, 11]


def to_kyutai(key: str, value: mx.array) -> tuple[str, mx.array]:
    """mlx-audio's Mimi parameter name/layout -> kyutai's PyTorch one (the inverse of load_pytorch_weights)."""
    if key.endswith((".conv.weight", ".output_proj.weight", ".input_proj.weight")):
        value = value.swapaxes(-1, -2)
    if key.endswith(".convtr.weight"):
        value = value.transpose(0, 2, 1) if value.shape[-1] == 1 else value.transpose(2, 0, 1)
    for side, first, last in (("encoder", "init_conv1d", "final_conv1d"), ("decoder", "init_conv1d", "final_conv1d")):
        key = key.replace(f"{side}.{first}.", f"{side}.model.0.").replace(f"{side}.{last}.", f"{side}.model.14.")
    key = re.sub(
        r"encoder\.layers\.(\d)\.residuals\.0\.", lambda m: f"encoder.model.{_ENCODER_BLOCKS[int(m[1])]}.", key
    )
    key = re.sub(
        r"encoder\.layers\.(\d)\.downsample\.", lambda m: f"encoder.model.{_ENCODER_BLOCKS[int(m[1])] + 2}.", key
    )
    key = re.sub(r"decoder\.layers\.(\d)\.upsample\.", lambda m: f"decoder.model.{_DECODER_BLOCKS[int(m[1])]}.", key)
    key = re.sub(
        r"decoder\.layers\.(\d)\.residuals\.0\.", lambda m: f"decoder.model.{_DECODER_BLOCKS[int(m[1])] + 1}.", key
    )
    key = re.sub(r"\.block\.([01])\.", lambda m: f".block.{2 * int(m[1]) + 1}.", key)
    key = key.replace(".codebook.", "._codebook.").replace(".in_proj.weight", ".in_proj_weight")
    key = key.replace(".gating.linear1.", ".linear1.").replace(".gating.linear2.", ".linear2.")
    return key, value


def _write_mimi(out: Path, full_size: bool, codebooks: int, dtype) -> None:
    from mlx_audio.codec.models.mimi.mimi import Mimi

    cfg = mimi_config(full_size, codebooks)
    mimi = Mimi(cfg)
    params = {}
    for key, value in tree_flatten(mimi.parameters()):
        if key.endswith((".conv.weight", ".convtr.weight")):
            # He-style init: MLX's default gives near-silent random Mimi output (RMS ~1e-14).
            fan_in = value.size // value.shape[0]
            value = mx.random.normal(value.shape) * (2.0 / fan_in) ** 0.5
        elif key.endswith("embedding_sum"):
            value = mx.random.normal(value.shape)
        elif key.endswith(("cluster_usage", "initialized")):
            value = mx.ones(value.shape)
        params[key] = value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value
    (out / "mimi").mkdir(exist_ok=True)
    kyutai = dict(to_kyutai(k, v) for k, v in params.items())
    mx.save_safetensors(str(out / "mimi" / MIMI_FILE), kyutai)
    (out / "mimi" / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    # Prove the layout: mlx-audio's converter must map every key back onto the same values.
    check = Mimi(cfg)
    check.load_pytorch_weights(str(out / "mimi" / MIMI_FILE), strict=True)
    for key, value in tree_flatten(check.parameters()):
        if not mx.allclose(value, params[key]).item():
            raise RuntimeError(f"Mimi key layout round trip failed at {key}")


def _write_prompts(out: Path, seconds: float) -> None:
    """Short voice-like signals (a gliding harmonic tone with noise) with transcripts."""
    (out / "prompts").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    sr = 24_000
    t = np.arange(int(sr * seconds)) / sr
    for i, (name, text) in enumerate(PROMPTS.items()):
        f0 = 110 + 40 * i + 20 * np.sin(2 * np.pi * 3 * t)
        phase = 2 * np.pi * np.cumsum(f0) / sr
        signal = sum(np.sin(k * phase) / k for k in range(1, 6)) * 0.2 + rng.normal(0, 0.01, t.size)
        pcm = (np.clip(signal, -1, 1) * 32767).astype("<i2")
        with wave.open(str(out / "prompts" / f"{name}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(sr)
            w.writeframes(pcm.tobytes())
        (out / "prompts" / f"{name}.txt").write_text(text)


def write_checkpoint(out: Path, full_size: bool = False, seed: int = 0, codebooks: int = CSM_CODEBOOKS) -> Path:
    """Write the checkpoint into `out` (created); returns `out`. `codebooks` below CSM's 32 (Mimi's first ones,
    as Moshi uses 8) makes each frame cheaper where only the code path matters: every part of the serving
    code reads the count from the checkpoint's config."""
    if full_size and codebooks != CSM_CODEBOOKS:
        raise ValueError(f"the full-size checkpoint is CSM-1B's architecture: {CSM_CODEBOOKS} codebooks")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    vocab = _write_tokenizer(out)
    # Full size stores bf16 like the published weights (kyutai's Mimi file is bf16); tiny stays float32.
    dtype = mx.bfloat16 if full_size else mx.float32
    _write_csm(out, csm_config(vocab, full_size, codebooks), dtype)
    _write_mimi(out, full_size, codebooks, dtype)
    _write_prompts(out, seconds=1.0)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--full-size", action="store_true", help="CSM-1B's architecture and the real Mimi (~3.4 GB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--codebooks",
        type=int,
        default=CSM_CODEBOOKS,
        choices=range(1, CSM_CODEBOOKS + 1),
        metavar="1-32",
        help="Mimi codebooks per frame (tiny only; CSM's 32 by default)",
    )
    args = parser.parse_args(argv)
    if args.full_size and args.codebooks != CSM_CODEBOOKS:
        parser.error(f"--full-size is CSM-1B's architecture: {CSM_CODEBOOKS} codebooks")
    write_checkpoint(args.out_dir, args.full_size, args.seed, args.codebooks)
    print(f"wrote {'full-size' if args.full_size else 'tiny'} random-weight checkpoint to {args.out_dir}")


if __name__ == "__main__":
    main()
