"""The Serve application: one builder applies every deployment's options and wires the graph.

    SpeechIngress -> TextFrontend
                  -> AudioEncoder -> CSMModel (exactly one replica)

Deployments are plain classes (testable without Ray); only this module knows they are Serve deployments.
`serve run serve_config.yaml` calls `build_app`, which runs in its own process: settings and voices are
loaded and validated here, once, and handed to the replicas through `.bind()`. Nothing here imports MLX:
only the model replica does.
"""

from __future__ import annotations

import os
from typing import Optional

from ray import serve
from ray.serve import Application

from .deployments.encoder import AudioEncoder
from .deployments.frontend import TextFrontend
from .deployments.ingress import SpeechIngress
from .deployments.model import CSMModel
from .logs import configure_logging
from .settings import STOP_GRACE_S, ConfigError, Settings
from .voices import VoiceLibrary

# Requests a replica takes besides speech streams: /health fans out to every deployment, and the lists.
CONTROL_HEADROOM = 16
# The ingress also answers the requests it turns away (429) and the lists; those end at once.
INGRESS_HEADROOM = 64


def deployment_options(settings: Settings) -> dict[str, dict]:
    """Serve options per deployment, derived from the settings.

    A speech stream holds a slot in every deployment it passes through, and the ingress admits at most
    MAX_BATCH_SIZE + MAX_QUEUED_REQUESTS of them (429 beyond that), so each deployment gets that many slots
    plus headroom: Serve's own queueing never decides before our admission does. Fractional CPUs: with
    Serve's default of one CPU per replica, four replicas do not all start on two cores."""
    streams = settings.max_batch_size + settings.max_queued_requests
    inner = streams + CONTROL_HEADROOM
    return {
        "SpeechIngress": dict(num_replicas=1, max_ongoing_requests=streams + INGRESS_HEADROOM,
                              ray_actor_options={"num_cpus": 0.1}),
        "TextFrontend": dict(num_replicas=1, max_ongoing_requests=inner, ray_actor_options={"num_cpus": 0.1}),
        "AudioEncoder": dict(num_replicas=1, max_ongoing_requests=inner, ray_actor_options={"num_cpus": 0.2},
                             graceful_shutdown_timeout_s=STOP_GRACE_S),
        # The MLX model: exactly one replica, which serialises its requests on one MLX thread. Serve calls
        # its check_health every period; a dead or hung MLX thread fails it and Serve replaces the replica.
        "CSMModel": dict(num_replicas=1, max_ongoing_requests=inner, ray_actor_options={"num_cpus": 0.5},
                         health_check_period_s=10, health_check_timeout_s=30,
                         graceful_shutdown_timeout_s=STOP_GRACE_S),
    }


def build_application(settings: Settings, voices: Optional[VoiceLibrary] = None) -> Application:
    """The bound application graph for these settings."""
    voices = voices or VoiceLibrary.load(settings.voices_dir)
    voices.resolve(settings.default_voice)  # DEFAULT_VOICE must name a preset or alias
    options = deployment_options(settings)

    def deployment(cls, name: str):
        return serve.deployment(cls, name=name, **options[name])

    model = deployment(CSMModel, "CSMModel").bind(settings, voices)
    encoder = deployment(AudioEncoder, "AudioEncoder").bind(settings, model)
    frontend = deployment(TextFrontend, "TextFrontend").bind(settings, voices)
    ingress = deployment(serve.ingress()(SpeechIngress), "SpeechIngress")  # the app is built on the replica
    return ingress.bind(settings, frontend, encoder, model)


def build_app(args: Optional[dict] = None) -> Application:
    """Serve's import_path target. `args` (from the config file) override environment settings by name."""
    overrides = {str(k).upper(): str(v) for k, v in (args or {}).items()}
    settings = Settings.load({**os.environ, **overrides})
    configure_logging(settings.log_level)
    try:
        return build_application(settings)
    except Exception as exc:  # the voice library's InvalidRequestError too: this is start-up
        raise ConfigError(str(getattr(exc, "message", exc))) from None
