"""Every model replica's health, where the ingress can read it: one entry per replica in Ray's cluster-wide
key-value store (the GCS), refreshed by the replica every few seconds.

A DeploymentHandle routes each call to one replica of its choosing, so /health cannot ask "every replica"
through it. Instead each model replica publishes its own health (node, device, state, batch, queue, memory)
under its replica id; the ingress lists them. An entry that has not been refreshed for STALE_S is reported as
gone (a dead replica cannot clean up after itself) and dropped after FORGET_S. Without a Ray cluster (Serve's
local testing mode) a process-local table stands in.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Optional

from pydantic import ValidationError

from serve_app.core.constants import LOGGER_NAME
from serve_app.core.health import ReplicaHealth

logger = logging.getLogger(LOGGER_NAME)

PUBLISH_EVERY_S = 2.0
STALE_S = 6.0  # an entry older than this (three missed publications): the replica is gone or hung
FORGET_S = 120.0
_NAMESPACE = "sesame_tts"
_LOCAL: dict[str, bytes] = {}  # local testing mode: no GCS


def _kv():
    import ray

    if not ray.is_initialized():
        return None
    from ray.experimental import internal_kv

    return internal_kv if internal_kv._internal_kv_initialized() else None


def _prefix(app: str) -> str:
    return f"model-health/{app}/"


def publish(app: str, replica_id: str, health: ReplicaHealth) -> None:
    """This replica's health, stamped with the time (the reader judges staleness)."""
    key = _prefix(app) + replica_id
    value = json.dumps({**health.body(), "replica": replica_id, "published": time.time()}).encode()
    kv = _kv()
    if kv is None:
        _LOCAL[key] = value
        return
    kv._internal_kv_put(key, value, overwrite=True, namespace=_NAMESPACE)


def withdraw(app: str, replica_id: str) -> None:
    key = _prefix(app) + replica_id
    kv = _kv()
    if kv is None:
        _LOCAL.pop(key, None)
    else:
        kv._internal_kv_del(key, namespace=_NAMESPACE)


def read(app: str) -> list[ReplicaHealth]:
    """Every model replica's latest health, oldest replica id first; stale ones marked `status: "gone"`."""
    prefix, kv, now = _prefix(app), _kv(), time.time()
    if kv is None:
        items = {k: v for k, v in _LOCAL.items() if k.startswith(prefix)}
    else:
        keys = kv._internal_kv_list(prefix, namespace=_NAMESPACE)
        items = {k.decode() if isinstance(k, bytes) else k: kv._internal_kv_get(k, namespace=_NAMESPACE) for k in keys}
    found = []
    for _key, value in sorted(items.items()):
        entry = _parse(value)
        if entry is None:
            continue
        age = now - entry["published"]
        if age > FORGET_S:
            withdraw(app, entry["replica"])
            continue
        entry["age_s"] = round(age, 1)
        if age > STALE_S:
            entry["status"] = "gone"
        try:
            found.append(ReplicaHealth.model_validate(entry))
        except ValidationError:  # not a replica's health (another version's, or damaged): not one of ours
            continue
    return found


def _parse(value: Optional[bytes]) -> Optional[dict]:
    """An entry as published (a dict with its replica id and time), or None if it cannot be one."""
    try:
        entry = json.loads(value) if value else None
    except (ValueError, TypeError):
        return None
    valid = isinstance(entry, dict) and isinstance(entry.get("replica"), str)
    return entry if valid and isinstance(entry.get("published"), (int, float)) else None
