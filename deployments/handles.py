"""Handle adapters that more than one deployment uses: deadlines and Ray errors mapped, the graph, sessions, jobs."""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve
from ray.exceptions import ObjectLostError, OwnerDiedError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, RequestCancelledError
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from serve_app.core.admission import Overloaded, current_deadline, remaining_s
from serve_app.core.config import Config
from serve_app.core.errors import GatewayTimeout, Gone, Sam3Error, ServiceUnavailable
from serve_app.core.logs import forward_to_serve_log
from serve_app.core.media import MediaItem, MediaStore
from serve_app.core.registry import Registry
from serve_app.core.state import KV, open_kv
from serve_app.core.stats import ModelStats
from serve_app.core.types import Prompt, SegmentParams, SegmentResult
from serve_app.image.service import EmbeddingLost

logger = logging.getLogger(__name__)


def shared_kv(config: Config) -> KV:
    """The shared state store, under this Serve application's name: apps on one store never see each other."""
    try:
        namespace = serve.get_replica_context().app_name or "default"
    except Exception:  # noqa: BLE001 - outside a replica (a driver script): one namespace for it
        namespace = "default"
    return open_kv(config, namespace)


def replica_logging(config: Config) -> None:
    """First thing in every replica: our loggers write into Serve's log of this replica at SAM3_LOG_LEVEL, each line
    with the id of the request being served (Serve's request context; serve_app/core/logs.py)."""
    from ray.serve.context import _get_serve_request_context

    forward_to_serve_log(config.log_level, lambda: _get_serve_request_context().request_id)


def shared_media(config: Config) -> MediaStore:
    """Generated files in the shared store: any replica serves a URL any other minted."""
    return MediaStore(config.media_max_bytes, config.media_ttl_s, kv=shared_kv(config))


class ReplicaModels:
    """The models one encoder or decoder replica holds: Serve's `serve.multiplexed` over `build(name, bundle)`,
    with a bound known only at run time (SAM3_MODELS_PER_REPLICA), the per-model counts (`stats`) and the Ray
    metric `sam3_model_events`.

    The multiplexer goes on a plain function: Serve keeps it on the decorated object (a bound method cannot carry
    one) and pushes the held ids to the controller, which routes requests by `multiplexed_model_id`. Past the bound
    it unloads the least recently used model."""

    def __init__(self, config: Config, build, on_request=None) -> None:
        self.config, self.build = config, build
        self.registry = Registry.from_config(config)
        self._events = metrics.Counter(
            "sam3_model_events", description="Per model and replica: requests, model loads and evictions "
            "(event = request, load, evict; encoders and decoders both count).", tag_keys=("model", "event"))
        self._on_request = on_request or (lambda model, seconds: None)
        self.stats = ModelStats(self.registry.names, self._event)

        async def _load_sam3_model(model_id: str):
            return await self._load(model_id)

        self._function = _load_sam3_model
        self._get = serve.multiplexed(max_num_models_per_replica=config.models_per_replica)(_load_sam3_model)

    def _event(self, kind: str, model: str, seconds: float) -> None:
        if kind == "request":
            self._on_request(model, seconds)
        self._events.inc(tags={"model": model, "event": kind})

    async def _load(self, name: str):
        from serve_app.image.models import load_bundle  # only model replicas load one: the rest never import torch

        spec = self.registry.resolve(name)
        started = time.perf_counter()
        bundle = await asyncio.to_thread(load_bundle, self.registry.config_for(self.config, spec.name))
        loaded = self.build(spec.name, bundle)
        self.stats.loaded(spec.name, time.perf_counter() - started)
        return loaded

    async def get(self, name: str | None = None) -> tuple[str, object]:
        """(name, what `build` made) of `name`, else the caller's multiplexed model id, else the default; loaded
        on first use."""
        name = name or serve.get_multiplexed_model_id() or self.registry.default
        loaded = await self._get(name)
        self.stats.holding(self.held())
        return name, loaded

    def held(self) -> dict:
        """{model name: what `build` made} of the models this replica holds now (loads nothing)."""
        wrapper = getattr(self._function, "__serve_multiplex_wrapper", None)
        return dict(wrapper.models) if wrapper is not None else {}


def unwrap(exc: BaseException) -> BaseException:
    """The Sam3Error a remote call raised, if that is what it was (through any number of hops)."""
    while isinstance(exc, RayTaskError) and isinstance(exc.cause, Sam3Error):
        exc = exc.cause
    return exc


async def call_session(sessions, session_id: str, owner: str, method: str, *args, timeout_s: float = 600.0,
                       failover: Failover | None = None):
    """Call one session method through its actor; a dead actor is 410 Gone (and forgotten), other sessions unaffected.

    The lookup (which actor holds the session) is re-sent when the VideoSessions replica answering it dies: the
    registry lives in the shared store, so its replacement (or another replica) answers the same. The call to the
    actor is not: the actor is the session, and a session call may change its state."""
    actor = await (failover or Failover(0)).call(lambda: sessions.lookup.remote(session_id, owner, True), 30.0)
    try:
        return await asyncio.wait_for(actor.call.remote(method, *args), timeout_s)
    except RayActorError:
        await sessions.forget_dead.remote(session_id, owner)
        raise Gone(
            f"video session {session_id!r} is gone: its tracker actor died. Start a new session."
        ) from None
    except RayTaskError as exc:
        raise unwrap(exc) from None
    except asyncio.TimeoutError:
        raise GatewayTimeout(
            f"video session {session_id!r} did not answer {method} within {timeout_s:g} s; the session is still open"
        ) from None
    finally:
        sessions.end.remote(session_id)  # fire and forget: the idle clock restarts when the call ends
async def await_call(awaitable, timeout_s: float, on_timeout=()):
    """Await a handle call with a deadline; turn Ray failures into errors a client can act on.

    `timeout_s` is cut to the current request's deadline (serve_app.core.admission). When the wait times out or
    the caller is cancelled (its client left), the call itself and `on_timeout`'s calls are cancelled too, so that
    the replicas downstream drop the work rather than finish it for nobody.
    """
    pending = list(on_timeout)
    if isinstance(awaitable, DeploymentResponse) and awaitable not in pending:
        pending.append(awaitable)
    timeout_s = remaining_s(timeout_s)

    async def wait():
        return await awaitable

    try:
        if timeout_s <= 0:
            raise asyncio.TimeoutError
        return await asyncio.wait_for(wait(), timeout_s)
    except asyncio.TimeoutError:
        for call in pending:
            call.cancel()
        raise GatewayTimeout(f"the model did not answer within the request's deadline ({max(timeout_s, 0):.3g} s "
                             "left; SAM3_REQUEST_TIMEOUT_S, X-Request-Timeout)") from None
    except asyncio.CancelledError:
        for call in pending:
            call.cancel()
        raise
    except Sam3Error as exc:  # raised here, or by a replica (the encoder decoding a corrupt image) and wrapped
        error = unwrap(exc)
        if isinstance(error, ReplicaDied) and isinstance(exc, RayTaskError):
            # a replica further down the path gave up on its own retries: the replica this call went to is alive
            error = ServiceUnavailable(error.message)
        raise error from None
    except (ObjectLostError, OwnerDiedError) as exc:
        raise EmbeddingLost(str(exc)) from None
    except BackPressureError:
        raise Overloaded("the model replicas' queues are full; retry shortly", retry_after_s=1) from None
    except RayActorError as exc:  # ActorDiedError, ActorUnavailableError: the replica serving the call is gone
        logger.warning("a replica failed while serving a request: %s", exc)
        raise ReplicaDied("a model replica died while serving this request; retry") from None
    except RequestCancelledError:
        raise ServiceUnavailable("the model call was cancelled; retry") from None


class ReplicaDied(ServiceUnavailable):
    """The replica serving a handle call died (or cannot be reached): an idempotent call may be sent again."""


RETRY_BACKOFF_S = (0.05, 0.25, 0.5, 1.0)  # before each retry; the last repeats. Serve's router learns of a dead
# replica from the failed call itself, so the first retry already goes to a live one (or waits for the replacement)


class Failover:
    """Re-sends idempotent handle calls whose replica died, within the call's deadline (SAM3_FAILOVER_RETRIES).

    `retries` and `deaths` count what happened, for /v1/stats and the `sam3_failover_retries` metric."""

    def __init__(self, retries: int) -> None:
        self.retries = retries
        self.counts = {"retried": 0, "recovered": 0, "gave_up": 0}
        self._metric = None

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        if self._metric is None:
            from ray.util import metrics

            self._metric = metrics.Counter(
                "sam3_failover", description="Idempotent model calls re-sent after a replica death, by outcome "
                "(retried, recovered, gave_up).", tag_keys=("outcome",))
        self._metric.inc(tags={"outcome": outcome})

    async def call(self, make, timeout_s: float, deadline: float | None = None):
        """`make()` issues the call (a DeploymentResponse or awaitable); its answer, re-issued after a replica death.

        `deadline` (time.time()): the request's, where the caller knows it (a replica down the path, which has no
        request context); otherwise the current request's (serve_app.core.admission), or `timeout_s` from now."""
        if deadline is not None:
            timeout_s = min(timeout_s, deadline - time.time())
        end = time.monotonic() + remaining_s(timeout_s)
        attempt = 0
        while True:
            try:
                result = await await_call(make(), end - time.monotonic())
            except ReplicaDied:
                pause = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
                if attempt >= self.retries or end - time.monotonic() <= pause:
                    if self.retries:
                        self._count("gave_up")
                    raise
                attempt += 1
                self._count("retried")
                await asyncio.sleep(pause)
                continue
            if attempt:
                self._count("recovered")
            return result


class RayGraph:
    """Encoder then decoder through deployment handles; the embedding is an ObjectRef the decoder resolves.

    Both calls are idempotent: when the replica serving one dies, it is sent again (`Failover`)."""

    def __init__(self, encoder: DeploymentHandle, decoder: DeploymentHandle, timeout_s: float,
                 failover: Failover | None = None) -> None:
        self.encoder, self.decoder, self.timeout_s = encoder, decoder, timeout_s
        self.failover = failover or Failover(0)
        self._embedding_bytes: dict[str | None, int] = {}

    @staticmethod
    def _routed(handle: DeploymentHandle, model: str | None) -> DeploymentHandle:
        """The handle that routes to replicas holding `model` (Serve's multiplexed routing); None: the default."""
        return handle.options(multiplexed_model_id=model) if model else handle

    async def encode(self, image, model: str | None = None) -> object:
        """`image`'s embedding ref by `model` (a registry name; None: the default), within the request's deadline
        (the one `image` carries, in the ImageCache)."""
        encoder = self._routed(self.encoder, model)

        async def once():
            response = encoder.encode.remote(image, model)
            ref = await await_call(response._to_object_ref(), self.timeout_s, (response,))
            await await_call(asyncio.wrap_future(ref.future()), self.timeout_s, (response,))  # surface its errors here
            return ref

        return await self.failover.call(once, self.timeout_s, getattr(image, "deadline", None))

    async def decode(
        self, embedding: object, prompts: list[Prompt], params: SegmentParams, size: tuple[int, int],
        model: str | None = None, expected: int = 1,
    ) -> SegmentResult:
        """`expected`: requests the caller has in flight (the decoder's batch waits for that many, briefly)."""
        deadline = current_deadline()
        decoder = self._routed(self.decoder, model)

        def once():
            return decoder.decode.remote(embedding, prompts, params, size, deadline, model, expected)

        return await self.failover.call(once, self.timeout_s)

    async def embedding_bytes(self, model: str | None = None) -> int:
        if model not in self._embedding_bytes:
            info = await await_call(self._routed(self.encoder, model).info.remote(model), self.timeout_s)
            self._embedding_bytes[model] = int(info["embedding_bytes"])
        return self._embedding_bytes[model]


class RayVideoBackend:
    """Sessions through the VideoSessions deployment; session calls go straight to the session's actor."""

    def __init__(self, sessions: DeploymentHandle, failover: Failover | None = None) -> None:
        self.sessions = sessions
        self.failover = failover or Failover(0)

    async def create(self, owner, data, frames, fps, model: str | None = None) -> dict:
        return await self.sessions.create.remote(owner, data, frames, fps, model)

    async def call(self, session_id: str, owner: str, method: str, *args):
        return await call_session(self.sessions, session_id, owner, method, *args, failover=self.failover)

    async def close(self, session_id: str, owner: str) -> dict:
        return await self.sessions.close.remote(session_id, owner)



class RayJobBackend:
    """The ingress' serve_app.jobs.backend.JobBackend: JobStore calls with a deadline and Ray errors mapped."""

    def __init__(self, store: DeploymentHandle, timeout_s: float = 30.0) -> None:
        self.store, self.timeout_s = store, timeout_s

    async def _call(self, method: str, *args, wait_s: float = 0.0):
        try:
            return await await_call(getattr(self.store, method).remote(*args), self.timeout_s + wait_s)
        except RayTaskError as exc:  # a store-side Sam3Error (404, 409, 429) arrives wrapped
            if isinstance(exc.cause, Sam3Error):
                raise exc.cause from None
            raise

    async def submit(self, tenant, model, kind, request, media_base, count, idempotency_key=None) -> list[dict]:
        return await self._call("submit", tenant, model, kind, request, media_base, count, idempotency_key)

    async def get(self, tenant: str, job_id: str) -> dict:
        return await self._call("get", tenant, job_id)

    async def active(self, tenant: str, model: str | None) -> list[dict]:
        return await self._call("active", tenant, model)

    async def cancel(self, tenant: str, job_id: str) -> dict:
        return await self._call("cancel", tenant, job_id)

    async def events(self, tenant: str, cursor: str | None, wait_s: float) -> dict:
        return await self._call("events", tenant, cursor, wait_s, wait_s=wait_s)

    async def media(self, media_id: str) -> MediaItem | None:
        found = await self._call("media", media_id)
        if found is None:
            return None
        data, content_type, owner, remaining_s = found
        return MediaItem(data, content_type, owner, time.monotonic() + remaining_s)


INLINE_BYTES = 100 * 1024  # Ray's own limit for passing an argument in the call itself rather than the object store


def _boxed(image) -> list:
    """[image] for the ImageCache to pass on: small encoded bytes inline, anything larger as an object-store reference
    (in a list, so that the cache replica on the way passes the reference on unresolved)."""
    import ray

    data = getattr(image, "data", None)
    if getattr(image, "pixels", None) is None and data is not None and len(data) <= INLINE_BYTES:
        return [image]
    return [ray.put(image)]


class RayCaches:
    """The ingress' serve_app.image.caches.Caches: the ImageCache replica, with deadlines and Ray errors mapped."""

    def __init__(self, cache: DeploymentHandle, timeout_s: float, failover: Failover | None = None) -> None:
        self.cache, self.timeout_s = cache, timeout_s
        self.failover = failover or Failover(0)

    async def _call(self, method: str, *args):
        """Every cache call is idempotent (a lookup, an encode of the same image, an overwrite): re-sent when the
        cache replica dies, to its replacement (it starts empty: a lookup then misses and the image is encoded)."""
        return await self.failover.call(lambda: getattr(self.cache, method).remote(*args), self.timeout_s)

    async def get_embedding(self, key: tuple):
        return await self._call("get_embedding", key)

    async def encode(self, key: tuple, image, height: int, width: int, model: str | None = None) -> object:
        """`image`: an EncoderInput (or pixels); only the encoder replica reads a large one (see `_boxed`)."""
        return (await self._call("encode", key, _boxed(image), height, width, model))[0]

    async def lookup_or_encode(self, key: tuple, image, height: int, width: int,
                               model: str | None = None) -> tuple[object, bool]:
        embedding, hit = await self._call("lookup_or_encode", key, _boxed(image), height, width, model)
        return embedding, hit

    async def pop_embedding(self, key: tuple) -> None:
        await self._call("pop_embedding", key)

    async def prior_logits(self, key: tuple, points: tuple, box: tuple | None):
        return await self._call("prior_logits", key, points, box)

    async def remember_logits(self, key: tuple, entry) -> None:
        await self._call("remember_logits", key, entry)

    async def stats(self) -> dict:
        return await await_call(self.cache.stats.remote(), 10.0)


class RayStreamBackend:
    """Live streams through the VideoStreams deployment; frames go straight to the stream's actor."""

    def __init__(self, streams: DeploymentHandle, timeout_s: float = 600.0) -> None:
        self.streams, self.timeout_s = streams, timeout_s
        self._actors: dict[str, object] = {}  # streams this replica opened, and its viewers -> the stream's actor
        self._watchers = 0

    async def open(self, owner: str, prompt) -> dict:
        info = await await_call(self.streams.open.remote(owner, prompt), self.timeout_s)
        self._actors[info["stream_id"]] = info.pop("actor")
        return info

    async def _actor_call(self, stream_id: str, method: str, *args):
        actor = self._actors.get(stream_id)
        if actor is None:
            raise Gone(f"video stream {stream_id!r} is closed")
        try:
            return await asyncio.wait_for(getattr(actor, method).remote(*args), self.timeout_s)
        except RayActorError:
            raise Gone(f"video stream {stream_id!r} is gone: its tracker actor died. Open a new stream.") from None
        except RayTaskError as exc:
            raise unwrap(exc) from None
        except asyncio.TimeoutError:
            raise GatewayTimeout(f"video stream {stream_id!r} did not answer within {self.timeout_s:g} s") from None

    async def push(self, stream_id: str, number: int, seq: int, data: bytes) -> dict:
        return await self._actor_call(stream_id, "push", number, seq, data)

    async def attach(self, stream_id: str, owner: str) -> str:
        actor = await await_call(self.streams.attach.remote(stream_id, owner), self.timeout_s)
        self._watchers += 1
        watch_id = f"{stream_id}#watch{self._watchers}"  # one per viewer: a viewer leaving detaches itself only
        self._actors[watch_id] = actor
        return watch_id

    async def watch(self, watch_id: str, after: int, wait_s: float) -> dict:
        return await self._actor_call(watch_id, "watch", after, wait_s)

    async def detach(self, watch_id: str) -> None:
        self._actors.pop(watch_id, None)

    async def close(self, stream_id: str, owner: str) -> None:
        self._actors.pop(stream_id, None)
        await await_call(self.streams.close.remote(stream_id, owner), 30.0)
