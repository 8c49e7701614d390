"""/health's judgement: from what the model replicas and the encoder report (core/health.py), whether this
server can serve now, why not, and the two bodies: the short one anyone may read, and the full one for a
trusted caller (the API key, or this machine itself). Pure functions: the ingress gathers, this decides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from serve_app.core.health import EncoderHealth, ReplicaHealth


@dataclass
class Verdict:
    """Whether the server can serve, its status word, and each reason it cannot as (in detail, for anyone)."""

    ok: bool
    status: str  # ok, draining, unavailable
    reasons: list[tuple[str, str]] = field(default_factory=list)
    replicas: list[ReplicaHealth] = field(default_factory=list)  # every replica, the reached one fresh
    serving: list[ReplicaHealth] = field(default_factory=list)

    @property
    def code(self) -> int:
        return 200 if self.ok else 503

    def public(self) -> dict[str, Any]:
        """For anyone: the status and a short why, never pids, paths, addresses, versions or voice ids."""
        return {"status": self.status, **({"reason": "; ".join(r[1] for r in self.reasons)} if self.reasons else {})}

    def degraded(self) -> list[str]:
        """The replicas that cannot serve while others do, one line each."""
        if not self.serving:
            return []
        return [
            f"{r.replica or '?'} on {r.node.get('ip', '?')}: {r.status}{f' ({r.error})' if r.error else ''}"
            for r in self.replicas
            if r not in self.serving
        ]


def judge(
    reached: ReplicaHealth, published: list[ReplicaHealth], encoder: EncoderHealth, several: bool, draining: bool
) -> Verdict:
    """`reached`: the replica this call reached (fresher than its published entry); `published`: every
    replica's entry. One replica configured: the reached one is the only truth (a killed one's last entry
    still reads "ready" until it goes stale, while its replacement loads). Several: each one's own state."""
    replicas = [reached if r.replica == reached.replica else r for r in published] or [reached]
    serving = [r for r in (replicas if several else [reached]) if r.serving]
    reasons = [
        (reached.error, f"model {reached.status}") if not serving and reached.error else None,
        None if encoder.ok else (encoder.ffmpeg, "ffmpeg is not available"),
        ("model is loading",) * 2 if not serving and reached.status == "loading" else None,
        ("shutting down",) * 2 if draining else None,
    ]
    ok = bool(serving) and encoder.ok and not draining
    status = "ok" if ok else ("draining" if draining else "unavailable")
    return Verdict(ok, status, [r for r in reasons if r], replicas, serving)
