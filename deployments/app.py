"""`build_app(config)`: binds Ingress -> ImageCache -> ImageEncoder -> Decoder, sessions and the queue, with options."""

from __future__ import annotations

from ray.serve import Application
from ray.serve.config import BackpressureConfig

from deployments.cache import ImageCache
from deployments.decoder import Decoder
from deployments.encoder import ImageEncoder
from deployments.ingress import Ingress
from deployments.jobs import JobRunner, JobStore
from deployments.stream import VideoStreams
from deployments.ui import WebUI
from deployments.video import VideoSessions
from serve_app.core.config import Config
from serve_app.core.logs import serve_logging_config


def _scaling(config: Config, replicas: int) -> dict:
    if config.autoscale:
        return {"autoscaling_config": {"min_replicas": 1, "max_replicas": config.autoscale_max_replicas,
                                       "target_ongoing_requests": config.autoscale_target_ongoing_requests,
                                       "upscale_delay_s": config.autoscale_upscale_delay_s,
                                       "downscale_delay_s": config.autoscale_downscale_delay_s,
                                       "look_back_period_s": config.autoscale_look_back_period_s}}
    return {"num_replicas": replicas}


# Serve's own bounds around the ingress' admission control (serve_app/core/admission.py). Admission keeps the
# model hops far below theirs; should one be reached, the handle call fails with BackPressureError (a 503 with
# Retry-After in the route's shape, deployments/handles.await_call). The ingress' is reached when requests come
# faster than the ingress reads them (10x capacity on 2 cores): Serve's proxy then answers its own 503 with
# Retry-After at once. At 1024 the same flood waited in front of the gate until 592 of 3,715 requests passed a 60 s
# client timeout; at 64 none did (docs/operations.md, "Overload").
MODEL_QUEUE = 64  # calls queued at each caller (router) of an encoder or decoder when every replica is at its max
INGRESS_QUEUE = 64  # requests queued for the ingress replicas past their 256 ongoing
BACKPRESSURE = BackpressureConfig(status_code=503, retry_after_s=1)


def _stopping(config: Config) -> dict:
    """How long a stopping replica (shutdown, redeploy, downscale) may finish what it serves: SAM3_SHUTDOWN_GRACE_S,
    checked every half second (Serve's defaults, 20 s and 2 s, would keep Ctrl-C waiting 20 s)."""
    return {"graceful_shutdown_timeout_s": config.shutdown_grace_s,
            "graceful_shutdown_wait_loop_s": min(0.5, max(config.shutdown_grace_s, 0.1))}


def _logs(config: Config, deployment) -> dict:
    """The deployment's LoggingConfig: SAM3_LOG_FORMAT and SAM3_LOG_LEVEL over its own (enable_access_log)."""
    return {"logging_config": serve_logging_config(config.log_format, config.log_level,
                                                   **(deployment.logging_config or {}))}


def build_app(config: Config) -> Application:
    service = {"num_cpus": config.num_cpus, "resources": dict(config.service_resources)}  # the CPU-side replicas
    stopping = _stopping(config)
    encoder = ImageEncoder.options(
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.encoder_num_gpus,
                           "resources": dict(config.model_resources)},
        max_ongoing_requests=max(16, 2 * config.encoder_max_batch_size),
        max_queued_requests=MODEL_QUEUE, backpressure_config=BACKPRESSURE, **stopping, **_logs(config, ImageEncoder),
        **_scaling(config, config.encoder_replicas),
    ).bind(config)
    decoder = Decoder.options(
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.decoder_num_gpus,
                           "resources": dict(config.model_resources)},
        max_ongoing_requests=max(16, config.decoder_threads * config.decoder_batches()[0]),
        max_queued_requests=MODEL_QUEUE, backpressure_config=BACKPRESSURE, **stopping,
        **_logs(config, Decoder), **_scaling(config, config.decoder_replicas),
    ).bind(config)
    cache = ImageCache.options(ray_actor_options=service, **stopping, **_logs(config, ImageCache)).bind(encoder, config)
    sessions = VideoSessions.options(ray_actor_options=service, **stopping, **_logs(config, VideoSessions)).bind(config)
    streams = VideoStreams.options(ray_actor_options=service, **stopping, **_logs(config, VideoStreams)).bind(config)
    jobs = JobStore.options(ray_actor_options=service, **stopping, **_logs(config, JobStore)).bind(config)
    runner = JobRunner.options(
        ray_actor_options=service, num_replicas=config.jobs_runner_replicas, **stopping, **_logs(config, JobRunner)
    ).bind(encoder, decoder, sessions, jobs, config, cache)
    ui = (WebUI.options(ray_actor_options=service, **stopping, **_logs(config, WebUI))
          .bind(encoder, decoder, sessions, config, cache) if config.web_ui else None)
    return Ingress.options(
        ray_actor_options=service,
        max_ongoing_requests=256, max_queued_requests=INGRESS_QUEUE, backpressure_config=BACKPRESSURE, **stopping,
        **_logs(config, Ingress), **_scaling(config, config.ingress_replicas),
    ).bind(encoder, decoder, config, sessions, jobs, runner, cache, ui, streams)


def app_builder(args: dict) -> Application:
    """Entry for `serve run cluster/serve_config.yaml`: `args` override SAM3_* environment variables."""
    return build_app(Config.from_env(**(args or {})))
