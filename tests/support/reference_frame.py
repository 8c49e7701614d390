"""The frame as the loop computed it before the one-function frame (commit a1c44ca's engine/batch.py), kept
to prove the new one computes the same bits: mlx-audio's RoPE with its stack, mlx-audio's depth decoder with
its own KVCache, each row's noise drawn on its own, the backbone step and the depth decoder as two calls.
`ReferenceFrameStep` takes FrameStep's arguments, so the scheduler runs either.

`python -m tests.support.reference_frame CHECKPOINT` prints, for the old frame and the new, compiled and not,
at batch 1 and 4: the kernels a GPU launches per steady frame (Mimi excluded) and the host's median time to
build that frame's graph (README, Performance: the before/after table)."""

from __future__ import annotations

import mlx.core as mx
from mlx_audio.lm.models.cache import make_prompt_cache


def _rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    even, odd = x[..., 0::2], x[..., 1::2]
    return mx.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1).reshape(x.shape)


def backbone_math(backbone, h: mx.array, positions: mx.array, keys: list, values: list):
    rows, capacity = h.shape[0], keys[0].shape[2]
    mask = (mx.arange(capacity)[None, :] <= positions[:, None]).reshape(rows, 1, 1, capacity)
    write_at = positions.reshape(rows, 1, 1, 1)
    rope = backbone.layers[0].self_attn.rope
    cos = rope._cos_f32[positions].astype(h.dtype).reshape(rows, 1, 1, -1)
    sin = rope._sin_f32[positions].astype(h.dtype).reshape(rows, 1, 1, -1)
    keys, values = list(keys), list(values)
    for i, layer in enumerate(backbone.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = _rope(attn.q_proj(x).reshape(rows, 1, attn.n_heads, attn.head_dim), cos, sin).swapaxes(1, 2)
        k = _rope(attn.k_proj(x).reshape(rows, 1, attn.n_kv_heads, attn.head_dim), cos, sin).swapaxes(1, 2)
        v = attn.v_proj(x).reshape(rows, 1, attn.n_kv_heads, attn.head_dim).swapaxes(1, 2)
        index = mx.broadcast_to(write_at, k.shape)
        keys[i] = mx.put_along_axis(keys[i], index, k.astype(keys[i].dtype), axis=2)
        values[i] = mx.put_along_axis(values[i], index, v.astype(values[i].dtype), axis=2)
        out = mx.fast.scaled_dot_product_attention(q, keys[i], values[i], scale=attn.scale, mask=mask)
        h = h + attn.o_proj(out.swapaxes(1, 2).reshape(rows, 1, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return backbone.norm(h)[:, -1, :], keys, values


def embed_frame(model, codes: mx.array) -> mx.array:
    offsets = mx.arange(codes.shape[1], dtype=mx.int32) * model.args.audio_vocab_size
    return model.audio_embeddings(codes + offsets).sum(axis=1, keepdims=True)


def sample(logits, noise, inv_temperature, top_k):
    logits = logits.astype(mx.float32)
    vocab = logits.shape[-1]
    threshold = mx.take_along_axis(mx.sort(logits, axis=-1), vocab - top_k, axis=-1)
    logits = mx.where(logits >= threshold, logits, -mx.inf)
    return mx.argmax(logits * inv_temperature + noise, axis=-1).astype(mx.int32)


def frame_codes(model, last, noise, inv_temperature, top_k):
    sampled = sample(model.codebook0_head(last), noise[:, 0], inv_temperature, top_k)
    codes = [sampled]
    curr = mx.concatenate([last[:, None, :], model._embed_audio(0, sampled[:, None])], axis=1)
    cache = make_prompt_cache(model.decoder)
    for i in range(1, noise.shape[1]):
        out = model.decoder(model.projection(curr), cache=cache)
        sampled = sample(out[:, -1, :] @ model.audio_head[i - 1], noise[:, i], inv_temperature, top_k)
        codes.append(sampled)
        curr = model._embed_audio(i, sampled[:, None])
    return mx.stack(codes, axis=1)


def draw_noise(keys: list, codebooks: int, vocab: int):
    pairs = [mx.random.split(key) for key in keys]
    noise = mx.stack([mx.random.gumbel(shape=(codebooks, vocab), key=pair[1]) for pair in pairs])
    return noise, [pair[0] for pair in pairs]


class ReferenceFrameStep:
    """The old loop's two calls (backbone step, then the frame decoder), each compiled when `compiled` is."""

    def __init__(self, model, compiled: bool):
        self.model, self.compiled = model, compiled
        self._backbone = mx.compile(self._backbone_step) if compiled else self._backbone_step
        self._decoder = mx.compile(self._frame_decoder) if compiled else self._frame_decoder

    def prepare(self, rows: int, joining: int, capacity: int) -> bool:
        return False

    def _backbone_step(self, h, positions, keys, values):
        return backbone_math(self.model.backbone, h, positions, keys, values)

    def _frame_decoder(self, last, keys, inv_temperature, top_k):
        args = self.model.args
        noise, keys = draw_noise(keys, args.audio_num_codebooks, args.audio_vocab_size)
        return frame_codes(self.model, last, noise, inv_temperature, top_k), keys

    def __call__(self, prev, positions, keys, values, joined, rng, inv_temperature, kth):
        top_k = self.model.args.audio_vocab_size - kth  # FrameStep takes the k-th place, the old loop top-k
        hidden = []
        if prev is not None:
            last, keys, values = self._backbone(embed_frame(self.model, prev), positions, keys, values)
            hidden.append(last)
        hidden += joined
        row_keys = [rng[i] for i in range(rng.shape[0])]
        codes, row_keys = self._decoder(mx.concatenate(hidden), row_keys, inv_temperature, top_k)
        return codes, mx.stack(row_keys), keys, values


def main(checkpoint: str) -> None:
    import json
    import statistics
    import time

    from ops.bench import kernels
    from ops.bench.frame_kernels import _flat, steady_inputs
    from serve_app.core.settings import Settings
    from serve_app.engine.frame import FrameStep
    from serve_app.model.loading import load_engine

    engine = load_engine(Settings(model_id=checkpoint, mlx_compile="off"))
    out = {}
    for name, cls in (("before", ReferenceFrameStep), ("after", FrameStep)):
        for compiled in (False, True):
            for batch in (1, 4):
                inputs = steady_inputs(engine, batch)
                with kernels.gpu_fast_ops():
                    names = kernels.primitives(_flat(cls(engine.model, compiled)(*inputs)))
                step = cls(engine.model, compiled)
                step(*inputs)  # traced (compiled) once, untimed
                times = []
                for _ in range(30):
                    started = time.perf_counter()
                    step(*inputs)
                    times.append(time.perf_counter() - started)
                out[f"{name} compiled={compiled} batch={batch}"] = {
                    "frame_kernels": kernels.kernels(names),
                    "graph_nodes": len(names),
                    "graph_build_ms": round(1000 * statistics.median(times), 2),
                }
                print(
                    json.dumps(
                        {f"{name} compiled={compiled} batch={batch}": out[f"{name} compiled={compiled} batch={batch}"]}
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    import sys

    main(sys.argv[1])
