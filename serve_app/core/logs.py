"""Logging set-up shared by every process of the app (builder, replicas, launcher).

Whatever a client sends may end up in a log line (a path, a voice name, a header): control characters are
escaped on the way out, so ESC sequences cannot repaint a terminal that tails the log, NUL and CR cannot cut
or forge lines, and bidirectional overrides cannot reorder what a reader sees.
"""

from __future__ import annotations

import logging
import re

from serve_app.core.constants import LOGGER_NAME
from serve_app.core.errors import APIError, unwrap

SERVE_LOGGER = "ray.serve"  # Ray Serve's own logger (ray.serve._private.constants.SERVE_LOGGER_NAME)

# C0 controls but tab, DEL, C1 controls, and the bidirectional embedding/override/isolate characters.
_CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def escape_controls(text: str) -> str:
    """`text` with every control character written as a visible escape (\\x1b, \\u202e)."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


class _EscapeControls(logging.Filter):
    """Formats the record's message once and escapes it (arguments included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        escaped = escape_controls(message)
        if escaped != message or record.args:
            record.msg, record.args = escaped, None
        return True


class _QuietRefusals(logging.Filter):
    """Drops Ray Serve's "Request failed." record (with its traceback, ~30 lines) for an expected refusal: a
    typed error that is not a bug (a 4xx, or a 503 such as a model still loading or a failed load). Such a
    refusal travels from the model or encoder replica back to the ingress, which answers it and logs it in
    the request's one line; Ray would log the traceback in every replica it passed. Bugs (500s and any other
    exception) keep their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info is None or record.exc_info[1] is None:
            return True
        error = unwrap(record.exc_info[1])
        return not (isinstance(error, APIError) and error.status_code != 500)


def configure_logging(level: str) -> logging.Logger:
    """Set the app logger's level; give it a handler only where nothing upstream prints it; keep expected
    refusals out of Serve's log as tracebacks (`_QuietRefusals`)."""
    serve_logger = logging.getLogger(SERVE_LOGGER)
    if not any(isinstance(f, _QuietRefusals) for f in serve_logger.filters):
        serve_logger.addFilter(_QuietRefusals())
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level.upper())
    if not any(isinstance(f, _EscapeControls) for f in logger.filters):
        logger.addFilter(_EscapeControls())
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    return logger
