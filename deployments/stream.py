"""VideoStreams deployment: one Ray actor per live stream (WebSocket /v1/video/streams), owner-checked and capped.

Stream actors are not detached: they share the fate of this replica (a stream does not outlive its connection, so
nothing is worth adopting after a restart). The ingress that holds the connection closes its stream when the client
leaves; the sweep here closes streams idle past SAM3_VIDEO_STREAM_IDLE_S (an ingress that died without closing).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from typing import TYPE_CHECKING

import ray
from ray import serve
from ray.serve import metrics  # Serve tags: deployment, replica, application

from deployments.handles import replica_logging, unwrap
from serve_app.core.config import Config
from serve_app.core.errors import Sam3Error
from serve_app.core.registry import Registry
from serve_app.core.stats import rss_bytes
from serve_app.image.sources import built_in_code
from serve_app.video.registry import SessionRegistry
from serve_app.video.stream_prompt import StreamPrompt

if TYPE_CHECKING:
    from serve_app.video.stream import VideoStream

logger = logging.getLogger(__name__)
SWEEP_EVERY_S = 5.0
ACTOR_NAMESPACE = "sam3"
WATCH_RING = 16  # the latest results kept for viewers (attach); older ones are gone


@ray.remote
class StreamActor:
    """Async shell around one VideoStream: frames are tracked in the order they were numbered, one at a time, in a
    worker thread, so that viewers, info and close are answered while a frame is being tracked."""

    def __init__(self, config: Config, video_model=None) -> None:
        # the model's imports are here, not at the top: the VideoStreams registry shares this module and loads none
        from serve_app.image.engine import ImageEngine
        from serve_app.image.models import load_bundle

        self.config = config
        self.engine = ImageEngine(load_bundle(config, video_model))
        self.stream: VideoStream | None = None
        self._turn = 0
        self._changed = asyncio.Condition()
        self._ring: deque[dict] = deque(maxlen=WATCH_RING)
        self._last_seq = -1
        self._closed = False

    async def start(self, prompt: StreamPrompt) -> dict:
        from serve_app.video.stream import VideoStream

        self.stream = VideoStream(self.engine, self.config, prompt)
        return self.stream.info()

    async def push(self, number: int, seq: int, data: bytes) -> dict:
        async with self._changed:
            await self._changed.wait_for(lambda: self._turn == number or self._closed)
        if self._closed:
            raise Sam3Error("the stream is closed")
        try:
            result = await asyncio.to_thread(self.stream.push, data)
            message = {"type": "frame", "seq": seq, **result}
            self._ring.append(message)
            self._last_seq = seq
            return result
        finally:
            async with self._changed:
                self._turn += 1
                self._changed.notify_all()

    async def watch(self, after: int, wait_s: float) -> dict:
        """Results with seq > after (at most WATCH_RING), waiting up to wait_s for the next one."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self._last_seq > after or self._closed), wait_s)
            except asyncio.TimeoutError:
                pass
        return {"messages": [m for m in self._ring if m["seq"] > after], "closed": self._closed}

    async def info(self) -> dict:
        return {**(self.stream.info() if self.stream else {}), "rss_bytes": rss_bytes()}

    async def close(self) -> None:
        self._closed = True
        async with self._changed:
            self._changed.notify_all()
        if self.stream is not None:
            self.stream.close()


@serve.deployment(name="VideoStreams", num_replicas=1)
class VideoStreams:
    """The registry of live streams: who owns which, the SAM3_VIDEO_MAX_STREAMS cap, the idle sweep."""

    def __init__(self, config: Config) -> None:
        replica_logging(config)
        models = Registry.from_config(config)
        config = models.config_for(config, models.default)  # streams track with the default model
        self.config = config
        self.registry: SessionRegistry[ray.actor.ActorHandle] = SessionRegistry(config.video_max_streams, math.inf)
        self.app = serve.get_replica_context().app_name or "default"
        # A model built in code (tiny-random, full-random) is built once, at the first stream, and shared through the
        # object store; weights from a directory are loaded by each stream's actor. Until a stream opens this
        # replica imports no torch (~190 MB of RSS and seconds of CPU at every start, for a server that may never
        # see a stream).
        self._model_ref = None
        self._model_lock = asyncio.Lock()
        self._owners: dict[str, str] = {}  # open stream id -> owner, for the sweep
        self._open = metrics.Gauge("sam3_video_streams_open", description="Live video streams open (this replica's "
                                   "registry; SAM3_VIDEO_MAX_STREAMS caps them).")
        self._open.set(0)
        self._sweeper = asyncio.get_event_loop().create_task(self._sweep())

    def actor_name(self, stream_id: str) -> str:
        return f"sam3-stream:{self.app}:{stream_id}"

    async def open(self, owner: str, prompt: StreamPrompt) -> dict:
        try:
            stream_id = self.registry.reserve()
        except Sam3Error as exc:  # the message names the sessions' knob: say the streams' one
            raise type(exc)(f"{self.config.video_max_streams} live video streams are open, the most this server "
                            "allows (SAM3_VIDEO_MAX_STREAMS); close one or retry later") from None
        try:
            model_ref = await self._shared_model()
        except BaseException:
            self.registry.release()
            raise
        actor = StreamActor.options(
            num_gpus=self.config.video_num_gpus, num_cpus=self.config.num_cpus, name=self.actor_name(stream_id),
            namespace=ACTOR_NAMESPACE,
        ).remote(self.config, model_ref)
        try:
            info = await actor.start.remote(prompt)
        except Exception as exc:  # noqa: BLE001 - a bad prompt must free its place and its actor
            self.registry.release()
            ray.kill(actor, no_restart=True)
            raise unwrap(exc) from None
        self.registry.add(stream_id, owner, actor)
        self._owners[stream_id] = owner
        self._open.set(len(self.registry))
        logger.info("video stream %s opened (%s)", stream_id, info["mode"])
        return {"stream_id": stream_id, "actor": actor, "actor_name": self.actor_name(stream_id), **info}

    async def _shared_model(self):
        """The object-store copy of a model built in code, built in a worker thread at the first stream (the event
        loop keeps answering attach, close and stats meanwhile); None for weights each actor loads itself."""
        if not built_in_code(self.config.model):
            return None
        async with self._model_lock:
            if self._model_ref is None:
                from serve_app.image.models import load_video_model

                model = await asyncio.to_thread(load_video_model, self.config)
                self._model_ref = ray.put(model)
            return self._model_ref

    async def attach(self, stream_id: str, owner: str) -> ray.actor.ActorHandle:
        return self.registry.get(stream_id, owner).handle

    async def close(self, stream_id: str, owner: str) -> None:
        try:
            record = self.registry.remove(stream_id, owner)
        except Sam3Error:
            return
        self._owners.pop(stream_id, None)
        self._open.set(len(self.registry))
        if record is not None:
            await self._stop(record.handle)
            logger.info("video stream %s closed", stream_id)

    async def stats(self) -> dict:
        return {"open_streams": len(self.registry), "max_streams": self.config.video_max_streams,
                "rss_bytes": rss_bytes()}

    async def _stop(self, actor: ray.actor.ActorHandle) -> None:
        try:
            await asyncio.wait_for(actor.close.remote(), 10.0)
        except Exception:  # noqa: BLE001 - dead or stuck: kill it anyway
            pass
        ray.kill(actor, no_restart=True)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            self._open.set(len(self.registry))  # Ray drops a gauge not set again within two report intervals
            for stream_id, owner in list(self._owners.items()):
                try:
                    actor = self.registry.get(stream_id, owner).handle
                    idle = (await asyncio.wait_for(actor.info.remote(), 10.0)).get("idle_s", 0.0)
                except Exception:  # noqa: BLE001 - a dead actor is as good as idle
                    idle = math.inf
                if idle > self.config.video_stream_idle_s + SWEEP_EVERY_S:
                    logger.info("video stream %s closed after %.0f s without a frame", stream_id, idle)
                    await self.close(stream_id, owner)

    async def __del__(self) -> None:
        for record in self.registry.expired(everything=True):
            await self._stop(record.handle)
