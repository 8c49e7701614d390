"""Logging set-up shared by every process of the app (builder, replicas, launcher)."""

from __future__ import annotations

import logging

LOGGER_NAME = "sesame_tts"


def configure_logging(level: str) -> logging.Logger:
    """Set the app logger's level; give it a handler only where nothing upstream prints it."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level.upper())
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    return logger
