"""Ingress deployment: the FastAPI app under @serve.ingress; parses every front door into one internal request."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, RequestCancelledError
from ray.serve.handle import DeploymentHandle

from serve_app.config import Config
from serve_app.errors import GatewayTimeout, Sam3Error, ServiceUnavailable, TooManyRequests
from serve_app.http import install_body_limit, install_error_handlers
from serve_app.protocols import native
from serve_app.service import ImageInputs, timed_segment
from serve_app.types import SegmentRequest, SegmentResult

logger = logging.getLogger(__name__)

DESCRIPTION = """Segment Anything 3 over HTTP. The native API is `/v1`; provider-compatible routes mirror
Oxen.ai, Segmind, Roboflow and the SAM3 Hugging Face Space. Masks are COCO RLE, polygons or PNG."""

app = FastAPI(title="sam3-serve", version="0.1.0", description=DESCRIPTION)
install_error_handlers(app)
_limits = {"max_request_bytes": Config.model_fields["max_request_bytes"].default}
install_body_limit(app, lambda: _limits["max_request_bytes"])


class RayGraph:
    """Encoder then decoder through deployment handles; the embedding goes replica to replica."""

    def __init__(self, encoder: DeploymentHandle, decoder: DeploymentHandle, timeout_s: float) -> None:
        self.encoder, self.decoder, self.timeout_s = encoder, decoder, timeout_s

    async def segment(self, request: SegmentRequest) -> SegmentResult:
        embedding = self.encoder.encode.remote(request.image)
        response = self.decoder.decode.remote(embedding, request.prompts, request.params, request.size)
        return await _await(response, self.timeout_s, (embedding, response))


async def _await(response, timeout_s: float, cancel: tuple = ()):
    """Await a handle call with a deadline; turn Ray failures into errors a client can act on."""

    async def wait():
        return await response

    try:
        return await asyncio.wait_for(wait(), timeout_s)
    except asyncio.TimeoutError:
        for pending in cancel:
            pending.cancel()
        raise GatewayTimeout(f"the model did not answer within {timeout_s:g} s (SAM3_REQUEST_TIMEOUT_S)") from None
    except Sam3Error:
        raise
    except BackPressureError:
        raise TooManyRequests("the model is at capacity; retry shortly") from None
    except (RayActorError, RequestCancelledError) as exc:
        logger.warning("a replica failed while serving a request: %s", exc)
        raise ServiceUnavailable("a model replica died while serving this request; retry") from None


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, encoder: DeploymentHandle, decoder: DeploymentHandle, config: Config) -> None:
        self.config = config
        self.encoder, self.decoder = encoder, decoder
        self.graph = RayGraph(encoder, decoder, config.request_timeout_s)
        self.inputs = ImageInputs(config)
        _limits["max_request_bytes"] = config.max_request_bytes

    @app.post("/v1/image/segment", response_model=native.SegmentResponseOut, tags=["native"])
    async def segment(self, body: native.SegmentRequestIn) -> native.SegmentResponseOut:
        """Concept (text / exemplar boxes) and visual (points / box) segmentation of one image."""
        started = time.perf_counter()
        image, key = await self.inputs.load(body.image, body.image_id)
        request = native.to_internal(body, image, key, self.config)
        result = await timed_segment(self.graph, request, started)
        return native.render(result, body, key)

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
        """Encoder batching and decoder counters (one replica each; Ray metrics aggregate all replicas)."""
        encoder = await _await(self.encoder.get_stats.remote(), 10.0)
        decoder = await _await(self.decoder.get_stats.remote(), 10.0)
        return {"model": self.config.model, "encoder": encoder, "decoder": decoder}
