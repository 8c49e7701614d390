"""The one exception -> OpenAI error body mapping, and errors surviving Ray's pickling."""

from __future__ import annotations

import json
import logging
import pickle

from serve_app.errors import (
    APIError, InvalidRequestError, ModelNotReadyError, ServiceUnavailableError, to_error_response, unwrap,
)


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
    assert body(r) == {"error": {"message": "The model is still loading", "type": "server_error", "param": None,
                                 "code": "model_not_ready"}}
    r = to_error_response(ServiceUnavailableError("no ffmpeg", code="ffmpeg_unavailable"))
    assert r.status_code == 503 and body(r)["error"]["code"] == "ffmpeg_unavailable"


def test_unexpected_errors_are_a_generic_500_with_details_only_in_the_log(caplog):
    with caplog.at_level(logging.ERROR, logger="sesame_tts"):
        r = to_error_response(KeyError("secret internal detail"))
    assert r.status_code == 500
    assert body(r)["error"]["type"] == "server_error"
    assert "secret" not in r.body.decode()
    assert "secret internal detail" in caplog.text
    assert isinstance(APIError("x"), Exception)
