"""The Serve application: one builder applies every deployment's options and wires the graph.

    SpeechIngress -> TextFrontend
                  -> AudioEncoder -> CSMModel (one replica per machine: MODEL_REPLICAS)

Deployments are plain classes (testable without Ray); only this module knows they are Serve deployments.
`serve run serve_config.yaml` calls `build_app`, which runs in its own process: settings and voices are
loaded and validated here, once, and handed to the replicas through `.bind()`. Nothing here imports MLX:
only the model replica does.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Optional

from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from serve_app.api.ingress import SpeechIngress
from serve_app.audio.encoder import AudioEncoder
from serve_app.core.constants import LOGGER_NAME, STOP_GRACE_S
from serve_app.core.logs import configure_logging
from serve_app.core.settings import ConfigError, Settings
from serve_app.model.replica import CSMModel
from serve_app.text.frontend import TextFrontend
from serve_app.voices.presets import VoiceLibrary

logger = logging.getLogger(LOGGER_NAME)

# Requests a replica takes besides speech streams: /health fans out to every deployment, and the lists.
CONTROL_HEADROOM = 16
# The ingress also answers the requests it turns away (429) and the lists, which end at once, and holds a
# slot for every request whose body is still arriving (RequestScreen's deadline bounds how long): an async
# replica, so many are cheap, and /health must never wait behind a crowd of slow clients.
INGRESS_HEADROOM = 512
# Beyond its slots, Serve's proxy queues this many requests for the ingress and answers the rest at once with
# a 503 and Retry-After (plain text: Serve's own answer), instead of letting them wait without bound.
INGRESS_QUEUE = 256
INGRESS_RETRY_AFTER_S = 5


MLX_RESOURCE = "mlx"  # the custom resource a machine that runs the model declares (ray start --resources)
HEAD_RESOURCE = "node:__internal_head__"  # Ray's own resource of the head node


def model_placement(settings: Settings) -> tuple[int, bool]:
    """(model replicas, whether they need the "mlx" resource).

    One replica per machine, because one MLX process owns one GPU: MODEL_REPLICAS replicas with Serve's
    max_replicas_per_node=1. "auto" counts the live Ray nodes that declare the "mlx" resource (all live nodes
    if none does), once, when the app is built; autoscaling is not used because a replica's start is a
    multi-gigabyte load (minutes on a first download), not something to do as a queue grows and shrinks."""
    wants_auto = settings.model_replicas == "auto"
    try:
        import ray

        nodes = [n for n in ray.nodes() if n.get("Alive")] if ray.is_initialized() else []
    except Exception:  # no cluster to ask (a unit test, local testing mode)
        nodes = []
    with_mlx = [n for n in nodes if n.get("Resources", {}).get(MLX_RESOURCE)]
    if not wants_auto:
        return int(settings.model_replicas), bool(with_mlx)
    count = len(with_mlx or nodes)
    if not count:
        logger.warning("MODEL_REPLICAS=auto but no Ray cluster is visible while building: one model replica")
    return max(1, count), bool(with_mlx)


def deployment_options(settings: Settings, replicas: int = 1, needs_mlx: bool = False) -> dict[str, dict]:
    """Serve options per deployment, derived from the settings and the model placement.

    A speech stream holds a slot in every deployment it passes through, and the ingress admits at most
    `replicas` x MAX_BATCH_SIZE + MAX_QUEUED_REQUESTS of them (429 beyond that), so each replica gets that
    many slots plus headroom: Serve's own queueing never decides before our admission does, even when the
    router sends more than its share to one replica. Fractional CPUs: with Serve's default of one CPU per
    replica, four replicas do not all start on two cores.

    With several machines, the encoder runs one replica beside each model replica (at most one per node) and
    calls the model on its own node first (handle prefer-local routing): PCM never crosses the network, only
    the encoded audio does."""
    streams = replicas * settings.max_batch_size + settings.max_queued_requests
    inner = streams + CONTROL_HEADROOM
    per_node = dict(num_replicas=replicas, max_replicas_per_node=1) if replicas > 1 else dict(num_replicas=1)
    model_actor = {"num_cpus": 0.5, **({"resources": {MLX_RESOURCE: 1}} if needs_mlx else {})}
    # Serve's access lines (one per call in every deployment: five for each /health poll) only with ACCESS_LOG;
    # every speech request has its own line either way (core/observability.py).
    logs = {"logging_config": {"enable_access_log": settings.access_log}}
    return {
        "SpeechIngress": dict(
            num_replicas=1,
            max_ongoing_requests=streams + INGRESS_HEADROOM,
            max_queued_requests=INGRESS_QUEUE,
            backpressure_config=BackpressureConfig(status_code=503, retry_after_s=INGRESS_RETRY_AFTER_S),
            ray_actor_options={"num_cpus": 0.1},
            **logs,
        ),
        # One text frontend, on the head: it owns the custom-voice store (voices/store.py), and its work per
        # request (checks and chunking) takes well under a millisecond.
        "TextFrontend": dict(
            num_replicas=1,
            max_ongoing_requests=inner,
            ray_actor_options={"num_cpus": 0.1, **({"resources": {HEAD_RESOURCE: 0.001}} if replicas > 1 else {})},
            **logs,
        ),
        "AudioEncoder": dict(
            **per_node,
            max_ongoing_requests=inner,
            ray_actor_options={"num_cpus": 0.2},
            graceful_shutdown_timeout_s=STOP_GRACE_S,
            **logs,
        ),
        # The MLX model: one replica per machine, each serialising its requests on one MLX thread. Serve calls
        # its check_health every period; a dead or hung MLX thread fails it and Serve replaces the replica.
        "CSMModel": dict(
            num_replicas=replicas,
            max_replicas_per_node=1,
            max_ongoing_requests=inner,
            ray_actor_options=model_actor,
            health_check_period_s=10,
            health_check_timeout_s=30,
            graceful_shutdown_timeout_s=STOP_GRACE_S,
            **logs,
        ),
    }


def build_application(settings: Settings, voices: Optional[VoiceLibrary] = None) -> Application:
    """The bound application graph for these settings."""
    voices = voices or VoiceLibrary.load(settings.voices_dir)
    voices.resolve(settings.default_voice)  # DEFAULT_VOICE must name a preset or alias
    replicas, needs_mlx = model_placement(settings)
    options = deployment_options(settings, replicas, needs_mlx)

    def deployment(cls, name: str):
        return serve.deployment(cls, name=name, **options[name])

    # Where the model replicas publish their health for the ingress's /health: one key per built app.
    health_key = uuid.uuid4().hex[:12]
    model = deployment(CSMModel, "CSMModel").bind(settings, voices, health_key=health_key)
    encoder = deployment(AudioEncoder, "AudioEncoder").bind(settings, model)
    frontend = deployment(TextFrontend, "TextFrontend").bind(settings, voices)
    ingress = deployment(serve.ingress()(SpeechIngress), "SpeechIngress")  # the app is built on the replica
    return ingress.bind(settings, frontend, encoder, model, model_replicas=replicas, health_key=health_key)


def build_app(args: Optional[dict] = None) -> Application:
    """Serve's import_path target. `args` (from the config file) override environment settings by name."""
    overrides = {str(k).upper(): str(v) for k, v in (args or {}).items()}
    settings = Settings.load({**os.environ, **overrides})
    configure_logging(settings.log_level)
    try:
        # Ray stores and ships what is bound: the replicas read the secrets themselves (Settings.with_secrets).
        return build_application(settings.without_secrets())
    except Exception as exc:  # the voice library's InvalidRequestError too: this is start-up
        raise ConfigError(str(getattr(exc, "message", exc))) from None
