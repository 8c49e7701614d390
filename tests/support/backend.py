"""What the engine's "same request, same audio" tests may expect on the backend they run on.

A request's rows are computed by the same code whatever shares its batch, but not always by the same
kernels: on Metal MLX takes a GEMV for a one-row matmul and a tiled GEMM for more rows (and CUDA picks by
shape too), so a row's sums can differ in the last bits with the batch's size, or with how many positions a
prefill takes at once. The Linux CPU backend's BLAS happens to give every row the same bits. Sampling then
amplifies a last-bit difference at a near tie into another code, and an autoregressive model carries it on.

So the tests compare byte for byte where the same shapes run (pipelined vs not, compiled vs not, at one batch
size: always), and where only the batch around a row differs (batched vs alone, reused prefix vs a full
prefill, Mimi batched vs alone), byte for byte when `ROWS_INDEPENDENT` (probed on this backend at start,
with the engine's own kinds of ops and dtypes), else on what holds there by construction: the same frames
and length, audible audio; and the teacher-forced comparison of the batched backbone step with the row alone
(test_batching) bounds the numeric difference on every backend.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np

AUDIBLE_RMS = 300  # int16 PCM: random Mimi weights with He init give RMS in the thousands


@functools.cache
def rows_independent() -> bool:
    """Whether a row's result is bitwise the same alone and among others, for the ops the engine runs:
    matmuls (1 row vs 2, 4 and 8 rows; a 15-position prefill inside a 400-position one), attention and
    Mimi's 1-d convolutions, in bfloat16 and float32."""
    key = mx.random.key(0)
    k1, k2, k3 = mx.random.split(key, 3)
    for dtype in (mx.bfloat16, mx.float32):
        w = mx.random.normal((256, 384), key=k1).astype(dtype)
        x = mx.random.normal((400, 256), key=k2).astype(dtype)
        for rows in (2, 4, 8, 400):
            if not mx.array_equal(x[:1] @ w, (x[:rows] @ w)[:1]).item():
                return False
        if not mx.array_equal(x[:15] @ w, (x @ w)[:15]).item():
            return False
        q = mx.random.normal((4, 8, 1, 64), key=k3).astype(dtype)
        kv = mx.random.normal((4, 8, 40, 64), key=k1).astype(dtype)
        alone = mx.fast.scaled_dot_product_attention(q[:1], kv[:1], kv[:1], scale=0.125)
        together = mx.fast.scaled_dot_product_attention(q, kv, kv, scale=0.125)[:1]
        if not mx.array_equal(alone, together).item():
            return False
        signal = mx.random.normal((3, 64, 32), key=k2).astype(dtype)
        kernel = mx.random.normal((32, 7, 32), key=k3).astype(dtype)
        if not mx.array_equal(mx.conv1d(signal[:1], kernel), mx.conv1d(signal, kernel)[:1]).item():
            return False
    return True


ROWS_INDEPENDENT = rows_independent()


def rms(pcm: bytes) -> float:
    samples = np.frombuffer(pcm, "<i2").astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0


def assert_same_speech(got: tuple[bytes, object], want: tuple[bytes, object]) -> None:
    """(PCM, Usage) of a request run among others (or from a reused prefix) vs the same request alone."""
    if ROWS_INDEPENDENT:
        assert got == want
        return
    (pcm, usage), (want_pcm, want_usage) = got, want
    assert usage.output_tokens == want_usage.output_tokens and usage.input_tokens == want_usage.input_tokens
    assert len(pcm) == len(want_pcm)
    assert rms(pcm) > AUDIBLE_RMS and rms(want_pcm) > AUDIBLE_RMS


def assert_same_pcm(got: np.ndarray, want: np.ndarray, min_snr_db: float = 40.0) -> None:
    """Decoded float PCM: equal where rows are independent, else within `min_snr_db` of each other."""
    if ROWS_INDEPENDENT:
        np.testing.assert_array_equal(got, want)
        return
    assert got.shape == want.shape
    noise = float(np.sum((got.astype(np.float64) - want) ** 2))
    power = float(np.sum(want.astype(np.float64) ** 2))
    assert noise == 0 or 10 * np.log10(power / noise) > min_snr_db, (power, noise)
