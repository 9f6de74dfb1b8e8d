"""VideoSessions deployment: one Ray actor per video session, owner-checked, capped, expired when idle, taken from a
pool of actors started ahead with the model loaded."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import time

import numpy as np
import ray
from ray import serve
from ray.serve import metrics  # Serve tags: deployment, replica, application

from deployments.handles import replica_logging, shared_kv, unwrap
from serve_app.core.config import Config
from serve_app.core.errors import Gone, Sam3Error, TooManyRequests
from serve_app.core.registry import Registry
from serve_app.core.stats import rss_bytes
from serve_app.image.models import built_in_code, load_video_model
from serve_app.video.actor import SessionState
from serve_app.video.pool import Warm, WarmPool
from serve_app.video.registry import SessionRegistry

logger = logging.getLogger(__name__)
SWEEP_EVERY_S = 5.0
REAP_EVERY_SWEEPS = 6  # look for actors a dead replica left behind every 30 s (and at start)
SESSIONS = "video_sessions"
ACTOR_NAMESPACE = "sam3"
ACTOR_PREFIX = "sam3-video"  # sam3-video:<app>:<replica>:<token>: every actor names the replica that started it
LEGACY_PREFIX = "sam3-session"  # sam3-session:<app>:<session id>, before the warm pool (adopted, never reaped)
SERVE_NAMESPACE = "serve"  # where Serve names its replica actors (ReplicaID.to_full_id_str())


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
    restarted replica adopts every session whose actor still lives; the others answer 410, never a hang.

    Warm start: `pool` keeps SAM3_VIDEO_WARM_SESSIONS actors started with the model loaded; a new session takes one
    (then refills in the background) and only decodes its video. Actors are named after the replica that started
    them, so the actors a dead replica left (its pool, a session half-way through create) are found and killed.
    """

    def __init__(self, config: Config) -> None:
        replica_logging(config)
        self.config = config
        self.registry: SessionRegistry[ray.actor.ActorHandle] = SessionRegistry(
            config.video_max_sessions, config.video_session_ttl_s, max_calls=config.video_session_max_calls
        )
        self.kv = shared_kv(config)
        context = serve.get_replica_context()
        self.app, self.replica_id = context.app_name or "default", context.replica_id
        self.lost: dict[str, str] = {}  # session id -> owner: sessions whose actor did not outlive a restart
        # Models built in code take seconds to build and a fraction of that to unpickle: build once, share.
        self.models = Registry.from_config(config)
        self._model_refs: dict[str, object] = {}
        self._shared_model(self.models.default)  # the default: built now, before the warm pool starts
        self.pool: WarmPool[ray.actor.ActorHandle] = WarmPool(
            config.video_warm_sessions, self._launch, _loaded, _kill
        )
        self._open = metrics.Gauge("sam3_video_sessions_open", description="Open video sessions (this replica's "
                                   "registry; SAM3_VIDEO_MAX_SESSIONS caps them).")
        self._adopt()
        self._reap()
        self.pool.fill(self.registry.free())
        self._open.set(len(self.registry))
        self._sweeper = asyncio.get_event_loop().create_task(self._sweep())

    def _shared_model(self, model: str):
        """An object-store copy of `model`'s weights when they are built in code (else None: the actor loads them)."""
        if model not in self._model_refs:
            config = self.models.config_for(self.config, model)
            self._model_refs[model] = ray.put(load_video_model(config)) if built_in_code(config.model) else None
        return self._model_refs[model]

    def _launch(self, model: str | None = None) -> tuple[str, ray.actor.ActorHandle]:
        """Start a session actor on `model` (None: the default, what the warm pool holds); its model loads in its
        __init__; `ready` answers once it has."""
        model = model or self.models.default
        name = f"{ACTOR_PREFIX}:{self.app}:{self.replica_id.unique_id}:{secrets.token_hex(6)}"
        actor = SessionActor.options(
            num_gpus=self.config.video_num_gpus, num_cpus=self.config.num_cpus, name=name,
            namespace=ACTOR_NAMESPACE, lifetime="detached",  # outlives this replica; closed, expired or adopted
        ).remote(self.models.config_for(self.config, model), self._shared_model(model))
        return name, actor

    def _adopt(self) -> None:
        for session_id, blob in list(self.kv.scan(SESSIONS)):
            record = json.loads(blob)
            owner = record["owner"]
            name = record.get("actor") or f"{LEGACY_PREFIX}:{self.app}:{session_id}"
            try:
                actor = ray.get_actor(name, namespace=ACTOR_NAMESPACE)
                self.registry.adopt(session_id, owner, actor)
            except (ValueError, TooManyRequests):
                self.lost[session_id] = owner
                self.kv.delete(SESSIONS, session_id)
        if len(self.registry) or self.lost:
            logger.info("video sessions: %d adopted, %d lost in a restart", len(self.registry), len(self.lost))

    def _reap(self) -> None:
        """Kill this app's actors that no session holds and whose replica is gone (warm ones, half-made sessions)."""
        prefix = f"{ACTOR_PREFIX}:{self.app}:"
        held = {json.loads(blob).get("actor") for _, blob in self.kv.scan(SESSIONS)}
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"]
            parts = name[len(prefix):].split(":") if name.startswith(prefix) else []
            if entry["namespace"] != ACTOR_NAMESPACE or len(parts) != 2 or name in held:
                continue
            if not self._replica_alive(parts[0]):
                logger.info("video sessions: killing %s, left behind by a replica that is gone", name)
                try:
                    ray.kill(ray.get_actor(name, namespace=ACTOR_NAMESPACE), no_restart=True)
                except ValueError:
                    pass

    def _replica_alive(self, unique_id: str) -> bool:
        if unique_id == self.replica_id.unique_id:
            return True
        other = dataclasses.replace(self.replica_id, unique_id=unique_id).to_full_id_str()
        try:
            ray.get_actor(other, namespace=SERVE_NAMESPACE)
            return True
        except ValueError:
            return False

    async def create(self, owner: str, data: bytes | None, frames: list[np.ndarray] | None, fps: float | None,
                     model: str | None = None) -> dict:
        """A session on `model` (a registry name; None: the default). The warm pool holds the default model, so a
        session on another one starts its actor cold."""
        started = time.perf_counter()
        model = self.models.resolve(model).name
        pooled = model == self.models.default
        session_id = self.registry.reserve()
        name, actor, warm = None, None, None
        try:
            warm = await self.pool.take() if pooled else None
            name, actor = (warm.name, warm.handle) if warm is not None else self._launch(model)
            self.pool.fill(self.registry.free())  # the replacement starts now, while this session decodes
            if warm is None:
                await actor.ready.remote()  # a cold start: the process starts and loads the model
            got_actor = time.perf_counter()
            info = await actor.call.remote("load", data, frames, fps)
        except BaseException as exc:  # a bad video (or a caller gone) frees its place and its actor
            self.registry.release()
            if actor is not None:
                self._after_failed_load(name, actor, exc, pooled)
            self.pool.fill(self.registry.free())
            if isinstance(exc, Exception):
                raise unwrap(exc) from None
            raise
        loaded = time.perf_counter()
        self.registry.add(session_id, owner, actor)
        self._open.set(len(self.registry))
        self.kv.put(SESSIONS, session_id, json.dumps({"owner": owner, "actor": name}).encode())
        # actor: waiting for a loaded actor (a pooled one: a ping); load: the actor's call, decode and VideoSession
        # inside it; create: all of this replica's part, the registry and the state store included
        timings = {"actor": _ms(got_actor - started), "load": _ms(loaded - got_actor), **info.pop("timings_ms", {}),
                   "create": _ms(time.perf_counter() - started)}
        logger.info("video session %s opened (%d frames, %s actor, %s ms)", session_id, info["num_frames"],
                    "warm" if warm is not None else "cold", timings)
        return {"session_id": session_id, "expires_after_idle_s": self.config.video_session_ttl_s, **info,
                "model": model, "warm_start": warm is not None, "timings_ms": timings}

    def _after_failed_load(self, name: str, actor: ray.actor.ActorHandle, exc: BaseException,
                           pooled: bool = True) -> None:
        """A video the actor refused (a 4xx) leaves it loaded and reusable: reset it into the pool (when it holds
        the default model). Anything else (the actor died, the caller went away mid-decode) kills it."""
        if pooled and isinstance(unwrap(exc), Sam3Error) and self.pool.size:
            asyncio.get_event_loop().create_task(self._recycle(name, actor))
        else:
            ray.kill(actor, no_restart=True)

    async def _recycle(self, name: str, actor: ray.actor.ActorHandle) -> None:
        try:
            await asyncio.wait_for(actor.call.remote("close"), 10.0)
            done = asyncio.get_event_loop().create_future()
            done.set_result(None)
            if self.pool.give_back(Warm(name, actor, done), self.registry.free()):
                return
        except Exception:  # noqa: BLE001 - dead or stuck: not worth keeping
            pass
        ray.kill(actor, no_restart=True)

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
        self.pool.fill(self.registry.free())

    async def close(self, session_id: str, owner: str) -> dict:
        if self.lost.pop(session_id, None) == owner:
            return {"session_id": session_id, "closed": True}
        record = self.registry.remove(session_id, owner)
        self._open.set(len(self.registry))
        if record is not None:
            self.kv.delete(SESSIONS, session_id)
            await self._stop(record.handle)
            self.pool.fill(self.registry.free())
        return {"session_id": session_id, "closed": True}

    async def stats(self) -> dict:
        return {"open_sessions": len(self.registry), "max_sessions": self.config.video_max_sessions,
                "warm": self.pool.stats(), "rss_bytes": rss_bytes()}

    async def _stop(self, actor: ray.actor.ActorHandle) -> None:
        try:
            await asyncio.wait_for(actor.call.remote("close"), 10.0)
        except Exception:  # noqa: BLE001 - dead or stuck: kill it anyway
            pass
        ray.kill(actor, no_restart=True)

    async def _sweep(self) -> None:
        sweeps = 0
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            sweeps += 1
            for record in self.registry.expired():
                self.kv.delete(SESSIONS, record.session_id)
                logger.info("video session %s expired after %.0f s idle", record.session_id, self.config.video_session_ttl_s)
                await self._stop(record.handle)
            self._open.set(len(self.registry))  # expiries, and sessions whose actor was found dead
            try:
                await self.pool.check()  # a pooled actor that died is replaced here, never handed out
                self.pool.fill(self.registry.free())
                if sweeps % REAP_EVERY_SWEEPS == 0:
                    self._reap()
            except Exception:
                logger.exception("video sessions: warm pool upkeep failed")

    async def __del__(self) -> None:
        """Graceful shutdown (delete, redeploy): detached actors would outlive the app, so close every session and
        kill the warm pool."""
        self._sweeper.cancel()
        self.pool.close()
        for record in self.registry.expired(everything=True):
            self.kv.delete(SESSIONS, record.session_id)
            await self._stop(record.handle)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


async def _loaded(actor: ray.actor.ActorHandle) -> None:
    """Returns once the actor's model is loaded (and, later, that it still answers); raises if it died."""
    await actor.ready.remote()


def _kill(actor: ray.actor.ActorHandle) -> None:
    ray.kill(actor, no_restart=True)
