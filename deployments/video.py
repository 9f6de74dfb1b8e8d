"""VideoSessions deployment: one Ray actor per video session, owner-checked, capped, expired when idle."""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
import ray
from ray import serve

from deployments.handles import shared_kv, unwrap
from serve_app.core.config import Config
from serve_app.core.errors import Gone, Sam3Error, TooManyRequests
from serve_app.core.stats import rss_bytes
from serve_app.image.models import built_in_code, load_video_model
from serve_app.video.actor import SessionState
from serve_app.video.registry import SessionRegistry

logger = logging.getLogger(__name__)
SWEEP_EVERY_S = 5.0
SESSIONS = "video_sessions"
ACTOR_NAMESPACE = "sam3"


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
    """The registry of sessions. Session actors are detached and the registry is in the shared state store, so a
    restarted replica adopts every session whose actor still lives; the others answer 410, never a hang."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.registry: SessionRegistry[ray.actor.ActorHandle] = SessionRegistry(
            config.video_max_sessions, config.video_session_ttl_s
        )
        self.kv = shared_kv(config)
        self.app = serve.get_replica_context().app_name or "default"
        self.lost: dict[str, str] = {}  # session id -> owner: sessions whose actor did not outlive a restart
        self._adopt()
        self._sweeper = asyncio.get_event_loop().create_task(self._sweep())
        # Models built in code take seconds to build and a fraction of that to unpickle: build once, share.
        self._model_ref = ray.put(load_video_model(config)) if built_in_code(config.model) else None

    def _actor_name(self, session_id: str) -> str:
        return f"sam3-session:{self.app}:{session_id}"

    def _adopt(self) -> None:
        for session_id, blob in list(self.kv.scan(SESSIONS)):
            owner = json.loads(blob)["owner"]
            try:
                actor = ray.get_actor(self._actor_name(session_id), namespace=ACTOR_NAMESPACE)
                self.registry.adopt(session_id, owner, actor)
            except (ValueError, TooManyRequests):
                self.lost[session_id] = owner
                self.kv.delete(SESSIONS, session_id)
        if len(self.registry) or self.lost:
            logger.info("video sessions: %d adopted, %d lost in a restart", len(self.registry), len(self.lost))

    async def create(self, owner: str, data: bytes | None, frames: list[np.ndarray] | None, fps: float | None) -> dict:
        session_id = self.registry.reserve()
        actor = SessionActor.options(
            num_gpus=self.config.video_num_gpus, num_cpus=self.config.num_cpus, name=self._actor_name(session_id),
            namespace=ACTOR_NAMESPACE, lifetime="detached",  # outlives this replica; closed, expired or adopted
        ).remote(self.config, self._model_ref)
        try:
            info = await actor.call.remote("load", data, frames, fps)
        except Exception as exc:  # noqa: BLE001 - a bad video must free its place and its actor
            self.registry.release()
            ray.kill(actor)
            raise unwrap(exc) from None
        self.registry.add(session_id, owner, actor)
        self.kv.put(SESSIONS, session_id, json.dumps({"owner": owner}).encode())
        logger.info("video session %s opened (%d frames)", session_id, info["num_frames"])
        return {"session_id": session_id, "expires_after_idle_s": self.config.video_session_ttl_s, **info}

    async def lookup(self, session_id: str, owner: str, begin: bool = False) -> ray.actor.ActorHandle:
        if self.lost.get(session_id) == owner:
            raise Gone(f"video session {session_id!r} is gone: it was lost when the video service restarted. "
                       "Start a new session.")
        return self.registry.get(session_id, owner, begin).handle

    async def end(self, session_id: str) -> None:
        self.registry.end(session_id)

    async def forget_dead(self, session_id: str, owner: str) -> None:
        """A caller found the actor dead: free its place under the cap."""
        try:
            self.registry.remove(session_id, owner)
            self.kv.delete(SESSIONS, session_id)
        except Sam3Error:
            pass

    async def close(self, session_id: str, owner: str) -> dict:
        if self.lost.pop(session_id, None) == owner:
            return {"session_id": session_id, "closed": True}
        record = self.registry.remove(session_id, owner)
        if record is not None:
            self.kv.delete(SESSIONS, session_id)
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
                self.kv.delete(SESSIONS, record.session_id)
                logger.info("video session %s expired after %.0f s idle", record.session_id, self.config.video_session_ttl_s)
                await self._stop(record.handle)

    async def __del__(self) -> None:
        """Graceful shutdown (delete, redeploy): detached actors would outlive the app, so close every session."""
        for record in self.registry.expired(everything=True):
            self.kv.delete(SESSIONS, record.session_id)
            await self._stop(record.handle)
