"""The one exception -> OpenAI error body mapping, and errors surviving Ray's pickling."""

from __future__ import annotations

import json
import logging
import pickle

import pytest

from serve_app.api.errors import to_error_response
from serve_app.api.limits import Admission
from serve_app.core.errors import (
    InvalidRequestError,
    ModelNotReadyError,
    OutOfMemoryError,
    PayloadTooLargeError,
    RateLimitError,
    ServiceUnavailableError,
    status_of,
    unwrap,
)
from serve_app.engine.mlx_memory import MemoryLimit


def body(response) -> dict:
    return json.loads(response.body)


def test_errors_keep_their_fields_through_pickle():
    error = pickle.loads(pickle.dumps(InvalidRequestError("bad voice", param="voice", code="invalid_voice")))
    assert isinstance(error, InvalidRequestError)
    assert (error.message, error.param, error.code, error.status_code) == ("bad voice", "voice", "invalid_voice", 400)


def test_unwrap_follows_ray_style_causes():
    class Wrapper(Exception):
        def __init__(self, cause):
            self.cause = cause

    inner = ModelNotReadyError("loading")
    assert unwrap(Wrapper(Wrapper(inner))) is inner


def test_status_and_body_per_error():
    r = to_error_response(ModelNotReadyError("The model is still loading"))
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert body(r) == {
        "error": {
            "message": "The model is still loading",
            "type": "server_error",
            "param": None,
            "code": "model_not_ready",
        }
    }
    r = to_error_response(ServiceUnavailableError("no ffmpeg", code="ffmpeg_unavailable"))
    assert r.status_code == 503 and body(r)["error"]["code"] == "ffmpeg_unavailable"


def test_unexpected_errors_are_a_generic_500_with_details_only_in_the_log(caplog):
    with caplog.at_level(logging.ERROR, logger="sesame_tts"):
        r = to_error_response(KeyError("secret internal detail"))
    assert r.status_code == 500
    assert body(r)["error"]["type"] == "server_error"
    assert "secret" not in r.body.decode()
    assert "secret internal detail" in caplog.text


def test_rate_limit_and_too_large_bodies_and_headers():
    response = to_error_response(RateLimitError("full", retry_after=4))
    assert response.status_code == 429 and response.headers["retry-after"] == "4"
    assert json.loads(response.body)["error"] == {
        "message": "full",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    response = to_error_response(PayloadTooLargeError("big"))
    assert response.status_code == 413 and "retry-after" not in response.headers
    assert json.loads(response.body)["error"]["code"] == "request_too_large"
    assert pickle.loads(pickle.dumps(RateLimitError("full", retry_after=9))).retry_after == 9


def test_replica_death_is_a_503_with_retry_after():
    from ray.exceptions import ActorDiedError

    response = to_error_response(ActorDiedError())
    assert response.status_code == 503 and response.headers["retry-after"].isdigit()
    assert json.loads(response.body)["error"]["code"] == "model_restarting"
    assert status_of(ActorDiedError()) == 503


def test_out_of_memory_is_a_503_and_mlx_allocation_failures_become_it():
    assert to_error_response(OutOfMemoryError("too much")).status_code == 503
    translated = MemoryLimit.translate(
        RuntimeError(
            "[metal::malloc] Attempting to allocate 9 GB which is greater than the maximum allowed buffer size"
        )
    )
    assert isinstance(translated, OutOfMemoryError) and translated.code == "out_of_memory"
    other = ValueError("shape mismatch")
    assert MemoryLimit.translate(other) is other


def test_admission_bounds_the_pipeline_and_estimates_retry_after(monkeypatch):
    import serve_app.api.limits as limits

    clock = [1000.0]
    monkeypatch.setattr(limits.time, "monotonic", lambda: clock[0])
    admission = Admission(max_queued=2)
    leases = [admission.admit() for _ in range(3)]
    with pytest.raises(RateLimitError) as info:
        admission.admit()
    assert 1 <= info.value.retry_after <= 30
    for _ in range(20):  # full pipeline of 3, one place freed every 10 s: each request takes ~30 s
        clock[0] += 10.0
        leases.pop(0).release()
        leases.append(admission.admit())
    with pytest.raises(RateLimitError) as info:
        admission.admit()
    assert info.value.retry_after == 10
    leases[0].release()
    leases[0].release()  # a lease is given back once, however often its response ends
    assert admission.active == 2
    admission.admit()  # a place freed
    assert admission.active == 3
