"""WebUI deployment: the one replica that holds the Gradio app (serve_app/ui/); every ingress replica forwards
/ui requests to it, since Gradio's queue and uploads live in its process."""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.handles import Failover, RayCaches, RayGraph, RayVideoBackend, replica_logging
from serve_app.core.config import Config
from serve_app.image.service import SegmentService
from serve_app.ui.host import UIHost
from serve_app.video.backend import set_video_backend


# one replica by design (see above); each open page holds a Server-Sent Events stream: allow many at once
@serve.deployment(name="WebUI", num_replicas=1, max_ongoing_requests=1000, logging_config={"enable_access_log": False})
class WebUI:
    """The same SegmentService over the same encoder and decoder as the ingress, and the same video sessions."""

    def __init__(
        self, encoder: DeploymentHandle, decoder: DeploymentHandle, sessions: DeploymentHandle, config: Config,
        cache: DeploymentHandle | None = None,
    ) -> None:
        replica_logging(config)
        failover = Failover(config.failover_retries)
        set_video_backend(RayVideoBackend(sessions, failover))
        caches = None if cache is None else RayCaches(cache, config.request_timeout_s, failover)  # shared with the APIs
        graph = RayGraph(encoder, decoder, config.request_timeout_s, failover)
        self.host = UIHost(SegmentService(config, graph, caches=caches))
        self.host.start_soon()

    async def request(self, scope: dict, body: bytes):
        """Streamed: the ASGI messages of one forwarded HTTP request."""
        async for message in self.host.handle(scope, body):
            yield message

    async def ready(self) -> bool:
        await self.host.ready()
        return True
