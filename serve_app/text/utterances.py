"""Utterance memory: what each speech response said, under its request id, for conversation context.

A response's id (the `x-request-id` header; ElevenLabs' `request-id`) names its voice, speaker, text and
the Mimi codes it generated. A later request that lists it in `previous_request_ids`, or that continues
the same `conversation`, gets it back as CSM context. Bounded twice: by the codes' bytes (least recently
used out first) and by age; a conversation keeps its last few turns, for a while.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

from serve_app.core.constants import LOGGER_NAME
from serve_app.core.errors import InvalidRequestError
from serve_app.core.messages import ContextSegment, Utterance

logger = logging.getLogger(LOGGER_NAME)


@dataclass
class _Kept:
    utterance: Utterance
    at: float


class UtteranceMemory:
    def __init__(self, max_bytes: int, max_age_s: float, turns: int, conversation_age_s: float, clock=time.monotonic):
        self.max_bytes, self.max_age_s = max_bytes, max_age_s
        self.turns, self.conversation_age_s = turns, conversation_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._kept: OrderedDict[str, _Kept] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._conversations: OrderedDict[str, tuple[list[str], float]] = OrderedDict()
        self.evicted = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def remember(self, request_id: str, utterance: Utterance, conversation: Optional[str] = None) -> None:
        if not self.enabled or utterance.nbytes > self.max_bytes:
            return
        with self._lock:
            now = self._clock()
            # A client may choose its request id (Serve keeps the one it sends): a later request never replaces
            # what an earlier one said under the same id. (`_get` has already dropped an expired one.)
            if self._get(request_id, now) is not None:
                logger.warning("request %s: an utterance is kept under this id already; not remembered", request_id)
                return
            self._kept[request_id] = _Kept(utterance, now)
            self._bytes += utterance.nbytes
            while self._bytes > self.max_bytes:
                oldest = next(iter(self._kept))
                self._drop(oldest)
                self.evicted += 1
            if conversation is not None:
                turns, _ = self._conversations.pop(conversation, ([], now))
                self._conversations[conversation] = ((turns + [request_id])[-self.turns :], now)
                while len(self._conversations) > 10_000:  # a bound on ids alone, whatever clients send
                    self._conversations.popitem(last=False)

    def _drop(self, request_id: str) -> None:
        kept = self._kept.pop(request_id, None)
        if kept is not None:
            self._bytes -= kept.utterance.nbytes

    def _get(self, request_id: str, now: float) -> Optional[Utterance]:
        kept = self._kept.get(request_id)
        if kept is None:
            return None
        if now - kept.at > self.max_age_s:
            self._drop(request_id)
            return None
        self._kept.move_to_end(request_id)
        return kept.utterance

    def context(self, request_ids: list[str], param: str = "previous_request_ids") -> list[ContextSegment]:
        """The utterances named, oldest first, as CSM context; an unknown or expired id is a 400 naming it."""
        with self._lock:
            now, found = self._clock(), []
            for request_id in request_ids:
                utterance = self._get(request_id, now)
                if utterance is None:
                    raise InvalidRequestError(
                        f"Unknown or expired request id '{request_id}' in '{param}': this server remembers "
                        f"responses for {self.max_age_s:g} s, and only while UTTERANCE_MEMORY_MB holds them.",
                        param=param,
                        code="unknown_request_id",
                    )
                found.append(utterance)
        return [segment(u) for u in found]

    def conversation(self, conversation: str) -> list[ContextSegment]:
        """The conversation's last turns still remembered, oldest first; none for a new (or expired) one."""
        with self._lock:
            now = self._clock()
            turns, at = self._conversations.get(conversation, ([], now))
            if now - at > self.conversation_age_s:
                self._conversations.pop(conversation, None)
                return []
            found = [u for u in (self._get(r, now) for r in turns) if u is not None]
        return [segment(u) for u in found]

    def matching_text(self, voice: str, text: str) -> list[ContextSegment]:
        """The most recent utterance of `voice` whose text is `text` (ElevenLabs' previous_text), if any. Words
        are compared, not punctuation: what was said is its chunks as CSM got them, each ending a sentence."""
        wanted = _words(text)
        with self._lock:
            now = self._clock()
            for request_id in reversed(list(self._kept)):
                kept = self._kept[request_id]
                u = kept.utterance
                if u.voice == voice and _words(u.text) == wanted and now - kept.at <= self.max_age_s:
                    return [segment(u)]
        return []

    def report(self) -> dict:
        with self._lock:
            return {
                "utterances": len(self._kept),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "max_age_s": self.max_age_s,
                "conversations": len(self._conversations),
                "evicted": self.evicted,
            }


def segment(utterance: Utterance) -> ContextSegment:
    return ContextSegment(utterance.speaker, utterance.text, codes=utterance.codes)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())
