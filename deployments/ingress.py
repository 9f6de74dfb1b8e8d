"""Ingress deployment: the FastAPI app under @serve.ingress; provider routers translate into one internal request."""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import ObjectLostError, OwnerDiedError, RayActorError
from ray.serve.exceptions import BackPressureError, RequestCancelledError
from ray.serve.handle import DeploymentHandle
from ray.util import metrics

from serve_app.config import Config
from serve_app.errors import GatewayTimeout, Sam3Error, ServiceUnavailable, TooManyRequests
from serve_app.http import install_body_limit, install_error_handlers
from serve_app.job_backend import set_job_backend
from serve_app.protocols import hf_space, native, oxen, oxen_queue, oxen_video, roboflow, segmind, video
from serve_app.service import EmbeddingLost, SegmentService, set_service
from serve_app.types import Prompt, SegmentParams, SegmentResult
from serve_app.video.actor import rss_bytes
from serve_app.video.backend import set_video_backend

logger = logging.getLogger(__name__)

DESCRIPTION = """Segment Anything 3 over HTTP. The native API is `/v1`; provider-compatible routes mirror
Oxen.ai, Segmind, Roboflow and the SAM3 Hugging Face Space. Masks are COCO RLE, polygons or PNG."""

app = FastAPI(title="sam3-serve", version="0.1.0", description=DESCRIPTION)
install_error_handlers(app)
_config = {"current": Config()}  # replaced by the replica's own config when it starts
install_body_limit(app, lambda: _config["current"])
for _provider in (native, oxen, oxen_video, oxen_queue, segmind, roboflow, hf_space, video):
    app.include_router(_provider.router)


async def _await(awaitable, timeout_s: float, on_timeout=()):
    """Await a handle call with a deadline; turn Ray failures into errors a client can act on."""

    async def wait():
        return await awaitable

    try:
        return await asyncio.wait_for(wait(), timeout_s)
    except asyncio.TimeoutError:
        for pending in on_timeout:
            pending.cancel()
        raise GatewayTimeout(f"the model did not answer within {timeout_s:g} s (SAM3_REQUEST_TIMEOUT_S)") from None
    except Sam3Error:
        raise
    except (ObjectLostError, OwnerDiedError) as exc:
        raise EmbeddingLost(str(exc)) from None
    except BackPressureError:
        raise TooManyRequests("the model is at capacity; retry shortly") from None
    except (RayActorError, RequestCancelledError) as exc:
        logger.warning("a replica failed while serving a request: %s", exc)
        raise ServiceUnavailable("a model replica died while serving this request; retry") from None


class RayGraph:
    """Encoder then decoder through deployment handles; the embedding is an ObjectRef the decoder resolves."""

    def __init__(self, encoder: DeploymentHandle, decoder: DeploymentHandle, timeout_s: float) -> None:
        self.encoder, self.decoder, self.timeout_s = encoder, decoder, timeout_s
        self._embedding_bytes: int | None = None

    async def encode(self, image) -> object:
        response = self.encoder.encode.remote(image)
        ref = await _await(response._to_object_ref(), self.timeout_s, (response,))
        await _await(asyncio.wrap_future(ref.future()), self.timeout_s, (response,))  # surface encoder errors here
        return ref

    async def decode(
        self, embedding: object, prompts: list[Prompt], params: SegmentParams, size: tuple[int, int]
    ) -> SegmentResult:
        response = self.decoder.decode.remote(embedding, prompts, params, size)
        return await _await(response, self.timeout_s, (response,))

    async def embedding_bytes(self) -> int:
        if self._embedding_bytes is None:
            info = await _await(self.encoder.info.remote(), self.timeout_s)
            self._embedding_bytes = int(info["embedding_bytes"])
        return self._embedding_bytes


class RayVideoBackend:
    """Sessions through the VideoSessions deployment; session calls go straight to the session's actor."""

    def __init__(self, sessions: DeploymentHandle) -> None:
        self.sessions = sessions

    async def create(self, owner, data, frames, fps) -> dict:
        return await self.sessions.create.remote(owner, data, frames, fps)

    async def call(self, session_id: str, owner: str, method: str, *args):
        from deployments.video import call_session

        return await call_session(self.sessions, session_id, owner, method, *args)

    async def close(self, session_id: str, owner: str) -> dict:
        return await self.sessions.close.remote(session_id, owner)


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(
        self, encoder: DeploymentHandle, decoder: DeploymentHandle, config: Config, sessions: DeploymentHandle | None = None,
        jobs: DeploymentHandle | None = None, job_runner: DeploymentHandle | None = None,
    ) -> None:
        self.config = config
        self.sessions = sessions
        if sessions is not None:
            set_video_backend(RayVideoBackend(sessions))
        if jobs is not None:  # job_runner is bound only so that it is deployed: it pulls its work from `jobs`
            from deployments.jobs import RayJobBackend

            set_job_backend(RayJobBackend(jobs))
        self.encoder, self.decoder = encoder, decoder
        lookups = metrics.Counter(
            "sam3_embedding_cache_lookups", description="Embedding cache lookups.", tag_keys=("result",)
        )
        self.service = SegmentService(
            config, RayGraph(encoder, decoder, config.request_timeout_s),
            on_cache=lambda hit: lookups.inc(tags={"result": "hit" if hit else "miss"}),
        )
        set_service(self.service)
        _config["current"] = config
        if not self.service.auth.enabled:
            logger.warning("auth is off: no SAM3_API_KEYS configured")

    @app.get("/healthz", tags=["ops"])
    async def healthz(self) -> dict:
        """Liveness: the ingress answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz(self) -> JSONResponse:
        """Readiness: the encoder and decoder replicas answer."""
        try:
            await _await(self.encoder.ready.remote(), 10.0)
            await _await(self.decoder.ready.remote(), 10.0)
        except Sam3Error as exc:
            return JSONResponse(status_code=503, content={"status": "not ready", "reason": exc.message})
        return JSONResponse({"status": "ready", "model": self.config.model})

    @app.get("/v1/stats", tags=["ops"])
    async def stats(self) -> dict:
        """Encoder batching, decoder counters and this ingress replica's caches (Ray metrics cover all replicas)."""
        encoder = await _await(self.encoder.get_stats.remote(), 10.0)
        decoder = await _await(self.decoder.get_stats.remote(), 10.0)
        video = await _await(self.sessions.stats.remote(), 10.0) if self.sessions is not None else None
        return {
            "model": self.config.model, "encoder": encoder, "decoder": decoder, "video": video,
            "ingress_rss_bytes": rss_bytes(), **self.service.stats(),
        }
