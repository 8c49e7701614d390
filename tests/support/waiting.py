"""Waiting on observable state instead of sleeping a fixed time: `wait_for` polls a condition until it
holds, and fails naming what never happened (a loaded machine only makes it wait longer)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str, timeout: float = 60, every: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(every)
    return value
