"""Per-request Mimi streaming state.

mlx-audio's Mimi keeps its streaming-decoder state inside its modules (the convolutions' carried-over
samples, the decoder transformer's KV cache), so one `MimiStreamingDecoder` can serve one stream at a time.
With several requests in the batch each needs its own: `MimiStream` holds one request's state and swaps it
into the shared modules for the duration of each decode, on the replica's one MLX thread.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

# The attributes mlx-audio's streaming conv modules carry between `step` calls.
_STATE_FIELDS = ("_prev_xs", "_left_pad_applied", "_prev_ys")


def stateful_modules(mimi) -> list:
    """The modules of Mimi's decoder path that carry streaming state (find them once per loaded Mimi)."""
    found = []
    for module in (mimi.upsample, mimi.decoder):
        for _, sub in module.named_modules():
            if hasattr(sub, "reset_state") and any(hasattr(sub, f) for f in _STATE_FIELDS):
                found.append(sub)
    return found


class MimiStream:
    """One request's Mimi decoder state: `decode` continues exactly where its previous call stopped."""

    def __init__(self, mimi, modules: list):
        self._mimi = mimi
        self._modules = modules  # stateful_modules(mimi)
        self._state: list[dict] | None = None  # None: a fresh stream
        self._cache = mimi.decoder_transformer.make_cache()

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes (K, T) -> float32 PCM (T * 1920 samples)."""
        mimi = self._mimi
        for i, module in enumerate(self._modules):
            if self._state is None:
                module.reset_state()
            else:
                for name, value in self._state[i].items():
                    setattr(module, name, value)
        shared_cache, mimi.decoder_cache = mimi.decoder_cache, self._cache
        try:
            tokens = mx.array(codes)[None]
            pcm = mx.concatenate([mimi.decode_step(tokens[:, :, t:t + 1]) for t in range(tokens.shape[-1])], axis=-1)
            out = np.array(pcm[0, 0].astype(mx.float32))
        finally:
            mimi.decoder_cache = shared_cache
            self._state = [{f: getattr(m, f) for f in _STATE_FIELDS if hasattr(m, f)} for m in self._modules]
        return out
