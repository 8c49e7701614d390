"""Logging set-up shared by every process of the app (builder, replicas, launcher).

Whatever a client sends may end up in a log line (a path, a voice name, a header): control characters are
escaped on the way out, so ESC sequences cannot repaint a terminal that tails the log, NUL and CR cannot cut
or forge lines, and bidirectional overrides cannot reorder what a reader sees.
"""

from __future__ import annotations

import logging
import re

from serve_app.core.constants import LOGGER_NAME

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


def configure_logging(level: str) -> logging.Logger:
    """Set the app logger's level; give it a handler only where nothing upstream prints it."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level.upper())
    if not any(isinstance(f, _EscapeControls) for f in logger.filters):
        logger.addFilter(_EscapeControls())
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    return logger
