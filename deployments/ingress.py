"""Ingress deployment: the FastAPI app under @serve.ingress; provider routers translate into one internal request."""

from __future__ import annotations

import asyncio
import logging
import math

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve import metrics  # Serve tags: deployment, replica, application

from deployments.handles import (
    Failover,
    RayCaches,
    RayGraph,
    RayJobBackend,
    RayStreamBackend,
    RayVideoBackend,
    await_call,
    replica_logging,
    shared_media,
)
from serve_app.core.admission import Admission
from serve_app.core.config import Config
from serve_app.core.registry import LITE_ARCH
from serve_app.core.errors import Sam3Error
from serve_app.core.http import SafeJSONResponse, install_error_handlers, install_gate, set_admission
from serve_app.core.media import set_media_store
from serve_app.core.openapi import NativeError, NotReady, error_responses
from serve_app.core.stats import rss_bytes
from serve_app.image.service import SegmentService, set_service
from serve_app.protocols.native import ModelList, ModelOut
from serve_app.jobs.backend import set_job_backend
from serve_app.protocols import (
    hf_space,
    native,
    oxen,
    oxen_queue,
    oxen_video,
    roboflow,
    segmind,
    segmind_queue,
    video,
    video_stream,
)
from serve_app.ui.bridge import ui_app
from serve_app.video.backend import set_video_backend
from serve_app.video.stream_backend import set_stream_backend

logger = logging.getLogger(__name__)
ADMISSION_REFRESH_S = 5.0


def admission_limit(config: Config, encoders: int, decoders: int, ingresses: int) -> int:
    """Model requests one ingress replica admits at once: SAM3_ADMISSION_RUNNING_PER_REPLICA per model replica
    (the fewer of encoder and decoder replicas), split over the ingress replicas.

    Under autoscaling, while the model deployments can still grow, the bound counts one replica more than runs:
    that replica's worth of requests queues at the model deployments' handles, where Serve's autoscaler counts it
    as ongoing, so the stage that is short of replicas shows more than its target and is scaled up (a bound of
    exactly what runs spreads the admitted requests over ingress, encoder and decoder, and none of them may reach
    its target). At the maximum the bound is what runs (docs/operations.md, "Overload and autoscaling")."""
    replicas = max(1, min(encoders, decoders))
    if config.autoscale and replicas < config.autoscale_max_replicas:
        replicas += 1
    return max(1, math.ceil(config.admission_running_per_replica * replicas / max(1, ingresses)))


def running_replicas(app_name: str | None) -> dict[str, int]:
    """RUNNING replicas per deployment of this application, from the Serve controller."""
    status = serve.status().applications.get(app_name or "default")
    if status is None:
        return {}
    return {name: d.replica_states.get("RUNNING", 0) for name, d in status.deployments.items()}

DESCRIPTION = """Segment Anything 3 over HTTP. The native API is `/v1`; provider-compatible routes mirror
Oxen.ai, Segmind, Roboflow and the SAM3 Hugging Face Space. Masks are COCO RLE, polygons or PNG."""

app = FastAPI(title="sam3-serve", version="0.1.0", description=DESCRIPTION, default_response_class=SafeJSONResponse)
install_error_handlers(app)
_config = {"current": Config()}  # replaced by the replica's own config when it starts
install_gate(app, lambda: _config["current"])
for _provider in (native, oxen, oxen_video, oxen_queue, segmind, segmind_queue, roboflow, hf_space, video, video_stream):
    app.include_router(_provider.router)
app.mount("/ui", ui_app)  # the web UI: forwarded to the WebUI replica, which holds the Gradio app


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(
        self, encoder: DeploymentHandle, decoder: DeploymentHandle, config: Config, sessions: DeploymentHandle | None = None,
        jobs: DeploymentHandle | None = None, job_runner: DeploymentHandle | None = None,
        cache: DeploymentHandle | None = None, ui: DeploymentHandle | None = None,
        streams: DeploymentHandle | None = None,
    ) -> None:
        replica_logging(config)
        self.config = config
        self.sessions = sessions
        self.failover = Failover(config.failover_retries)  # idempotent calls re-sent when their replica dies
        if sessions is not None:
            set_video_backend(RayVideoBackend(sessions, self.failover))
        if streams is not None:  # live streams over WebSocket (docs/video-streams.md)
            set_stream_backend(RayStreamBackend(streams))
        if jobs is not None:  # job_runner is bound only so that it is deployed: it pulls its work from `jobs`
            set_job_backend(RayJobBackend(jobs))
        self.encoder, self.decoder = encoder, decoder
        lookups = metrics.Counter(
            "sam3_embedding_cache_lookups", description="Embedding cache lookups.", tag_keys=("result",)
        )
        self.service = SegmentService(
            config, RayGraph(encoder, decoder, config.request_timeout_s, self.failover),
            on_cache=lambda hit: lookups.inc(tags={"result": "hit" if hit else "miss"}),
            caches=None if cache is None else RayCaches(cache, config.request_timeout_s, self.failover),
        )
        set_service(self.service)
        if ui is not None:
            ui_app.connect(lambda scope, body: ui.options(stream=True).request.remote(scope, body),
                           config.max_request_bytes)
        set_media_store(shared_media(config))  # any replica serves any media URL
        admissions = metrics.Counter(
            "sam3_admission", description="Image model requests by admission outcome (admitted, waited, refused_*, "
            "cancelled_waiting, expired_waiting).", tag_keys=("outcome",))
        # until _follow_replicas reads the running counts: autoscaling starts every deployment at min_replicas 1
        start = (1, 1, 1) if config.autoscale else (config.encoder_replicas, config.decoder_replicas,
                                                    config.ingress_replicas)
        self.admission = Admission(
            admission_limit(config, *start),
            config.admission_max_wait_s, config.max_inflight_per_key,
            on_count=lambda outcome: admissions.inc(tags={"outcome": outcome}))
        set_admission(self.admission)
        self._resizer = asyncio.get_event_loop().create_task(self._follow_replicas()) if config.autoscale else None
        _config["current"] = config
        if not self.service.auth.enabled:
            logger.warning("auth is off: no SAM3_API_KEYS configured")

    async def _follow_replicas(self) -> None:
        """Under autoscaling, the admission bound follows the model replicas that run (read every few seconds)."""
        while True:
            await asyncio.sleep(ADMISSION_REFRESH_S)
            try:
                counts = await asyncio.to_thread(running_replicas, serve.get_replica_context().app_name)
            except Exception as exc:  # noqa: BLE001 - the controller is busy or restarting: keep the last bound
                logger.debug("could not read replica counts: %s", exc)
                continue
            limit = admission_limit(self.config, counts.get("ImageEncoder", 1), counts.get("Decoder", 1),
                                    counts.get("Ingress", 1))
            if limit != self.admission.limit:
                logger.info("admission bound %d -> %d (replicas %s)", self.admission.limit, limit, counts)
                self.admission.resize(limit)

    @app.get("/healthz", tags=["ops"])
    async def healthz(self) -> dict:
        """Liveness: the ingress answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses={503: {"model": NotReady, "description": "A model replica is down."}})
    async def readyz(self) -> JSONResponse:
        """Readiness: the encoder and decoder replicas answer."""
        try:
            await await_call(self.encoder.ready.remote(), 10.0)
            await await_call(self.decoder.ready.remote(), 10.0)
        except Sam3Error as exc:
            return JSONResponse(status_code=503, content={"status": "not ready", "reason": exc.message})
        return JSONResponse({"status": "ready", "model": self.config.model,
                             "models": self.service.registry.names, "default_model": self.service.registry.default})

    @app.get("/v1/models", tags=["native"], response_model=ModelList,
             responses=error_responses(NativeError, 401, 429, 503, 504))
    async def models(self) -> ModelList:
        """The models this service serves (SAM3_MODELS), the default, and whether an encoder and a decoder replica
        hold each one now (one replica of each is asked; a model not held loads on its first request)."""
        encoder = await await_call(self.encoder.get_stats.remote(), 10.0)
        decoder = await await_call(self.decoder.get_stats.remote(), 10.0)
        registry = self.service.registry
        return ModelList(default=registry.default, models=[
            ModelOut(name=name, source=spec.source, architecture=self.service.arch(name),
                     default=name == registry.default,
                     loaded={"encoder": encoder["models"].get(name, {}).get("loaded", False),
                             "decoder": decoder["models"].get(name, {}).get("loaded", False)},
                     prompts=["concept"] if self.service.arch(name) == LITE_ARCH else ["concept", "visual", "auto"],
                     video=self.service.arch(name) != LITE_ARCH,
                     stats={"encoder": encoder["models"].get(name, {}), "decoder": decoder["models"].get(name, {})})
            for name, spec in registry.specs.items()])

    @app.get("/v1/stats", tags=["ops"], responses=error_responses(NativeError, 401, 429, 503, 504))
    async def stats(self) -> dict:
        """Encoder batching, decoder counters and this ingress replica's caches (Ray metrics cover all replicas)."""
        encoder = await await_call(self.encoder.get_stats.remote(), 10.0)
        decoder = await await_call(self.decoder.get_stats.remote(), 10.0)
        video = await await_call(self.sessions.stats.remote(), 10.0) if self.sessions is not None else None
        return {
            "model": self.config.model, "models": self.service.registry.names,
            "default_model": self.service.registry.default, "encoder": encoder, "decoder": decoder, "video": video,
            "ingress_rss_bytes": rss_bytes(), "ingress_replica": serve.get_replica_context().replica_id.unique_id,
            "admission": self.admission.stats(), "failover": dict(self.failover.counts),
            **(await self.service.stats()),
        }
