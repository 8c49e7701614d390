"""The Serve application: one builder applies every deployment's options and wires the graph.

    SpeechIngress -> TextFrontend
                  -> AudioEncoder -> CSMModel (exactly one replica)

Deployments are plain classes (testable without Ray); only this module knows they are Serve deployments.
`serve run serve_config.yaml` calls `build_app`, which runs in its own process: settings and voices are
loaded and validated here, once, and handed to the replicas through `.bind()`.
"""

from __future__ import annotations

from typing import Optional

from ray import serve
from ray.serve import Application

from .deployments.encoder import AudioEncoder
from .deployments.frontend import TextFrontend
from .deployments.ingress import SpeechIngress
from .deployments.model import CSMModel
from .logs import configure_logging
from .settings import ConfigError, Settings
from .voices import VoiceLibrary

# Fractional CPUs: with Serve's default of one CPU per replica, four replicas do not all start on two cores.
# A stream holds a slot in every deployment it passes through, so the slot counts match.
DEPLOYMENT_OPTIONS = {
    "SpeechIngress": dict(num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1}),
    "TextFrontend": dict(num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1}),
    "AudioEncoder": dict(num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.2}),
    # The MLX model: exactly one replica, which serialises its requests on one MLX thread.
    "CSMModel": dict(num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.5},
                     health_check_period_s=10, graceful_shutdown_timeout_s=30),
}


def build_application(settings: Settings, voices: Optional[VoiceLibrary] = None) -> Application:
    """The bound application graph for these settings."""
    voices = voices or VoiceLibrary.load(settings.voices_dir)
    voices.resolve(settings.default_voice)  # DEFAULT_VOICE must name a preset or alias
    model = serve.deployment(CSMModel, name="CSMModel", **DEPLOYMENT_OPTIONS["CSMModel"]).bind(settings, voices)
    encoder = serve.deployment(AudioEncoder, name="AudioEncoder", **DEPLOYMENT_OPTIONS["AudioEncoder"]).bind(settings, model)
    frontend = serve.deployment(TextFrontend, name="TextFrontend", **DEPLOYMENT_OPTIONS["TextFrontend"]).bind(settings, voices)
    ingress_cls = serve.ingress()(SpeechIngress)  # the app is built on the replica
    ingress = serve.deployment(ingress_cls, name="SpeechIngress", **DEPLOYMENT_OPTIONS["SpeechIngress"])
    return ingress.bind(settings, frontend, encoder, model)


def build_app(args: Optional[dict] = None) -> Application:
    """Serve's import_path target. `args` (from the config file) override environment settings by name."""
    overrides = {str(k).upper(): str(v) for k, v in (args or {}).items()}
    import os

    settings = Settings.load({**os.environ, **overrides})
    configure_logging(settings.log_level)
    try:
        return build_application(settings)
    except Exception as exc:  # the voice library's InvalidRequestError too: this is start-up
        raise ConfigError(str(getattr(exc, "message", exc))) from None
