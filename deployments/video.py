"""VideoSessions deployment: one Ray actor per video session, owner-checked, capped, expired when idle."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import ray
from ray import serve

from deployments.handles import unwrap
from serve_app.core.config import Config
from serve_app.core.errors import Sam3Error
from serve_app.core.stats import rss_bytes
from serve_app.image.models import built_in_code, load_video_model
from serve_app.video.actor import SessionState
from serve_app.video.registry import SessionRegistry

logger = logging.getLogger(__name__)
SWEEP_EVERY_S = 5.0


@ray.remote
class SessionActor:
    """A thin Ray shell around SessionState; each method is one call of the session API."""

    def __init__(self, config: Config, video_model=None) -> None:
        self.state = SessionState(config, video_model=video_model)

    def call(self, method: str, *args):
        return getattr(self.state, method)(*args)

    def ready(self) -> bool:
        return True


@serve.deployment(name="VideoSessions", num_replicas=1)
class VideoSessions:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.registry: SessionRegistry[ray.actor.ActorHandle] = SessionRegistry(
            config.video_max_sessions, config.video_session_ttl_s
        )
        self._sweeper = asyncio.get_event_loop().create_task(self._sweep())
        # Models built in code take seconds to build and a fraction of that to unpickle: build once, share.
        self._model_ref = ray.put(load_video_model(config)) if built_in_code(config.model) else None

    async def create(self, owner: str, data: bytes | None, frames: list[np.ndarray] | None, fps: float | None) -> dict:
        session_id = self.registry.reserve()
        actor = SessionActor.options(
            num_gpus=self.config.video_num_gpus, num_cpus=self.config.num_cpus
        ).remote(self.config, self._model_ref)
        try:
            info = await actor.call.remote("load", data, frames, fps)
        except Exception as exc:  # noqa: BLE001 - a bad video must free its place and its actor
            self.registry.release()
            ray.kill(actor)
            raise unwrap(exc) from None
        self.registry.add(session_id, owner, actor)
        logger.info("video session %s opened (%d frames)", session_id, info["num_frames"])
        return {"session_id": session_id, "expires_after_idle_s": self.config.video_session_ttl_s, **info}

    async def lookup(self, session_id: str, owner: str, begin: bool = False) -> ray.actor.ActorHandle:
        return self.registry.get(session_id, owner, begin).handle

    async def end(self, session_id: str) -> None:
        self.registry.end(session_id)

    async def forget_dead(self, session_id: str, owner: str) -> None:
        """A caller found the actor dead: free its place under the cap."""
        try:
            self.registry.remove(session_id, owner)
        except Sam3Error:
            pass

    async def close(self, session_id: str, owner: str) -> dict:
        record = self.registry.remove(session_id, owner)
        if record is not None:
            await self._stop(record.handle)
        return {"session_id": session_id, "closed": True}

    async def stats(self) -> dict:
        return {"open_sessions": len(self.registry), "max_sessions": self.config.video_max_sessions,
                "rss_bytes": rss_bytes()}

    async def _stop(self, actor: ray.actor.ActorHandle) -> None:
        try:
            await asyncio.wait_for(actor.call.remote("close"), 10.0)
        except Exception:  # noqa: BLE001 - dead or stuck: kill it anyway
            pass
        ray.kill(actor, no_restart=True)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            for record in self.registry.expired():
                logger.info("video session %s expired after %.0f s idle", record.session_id, self.config.video_session_ttl_s)
                await self._stop(record.handle)


