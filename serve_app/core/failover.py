"""What is retried when a replica dies, per route, and the middleware that does it in Serve's HTTP proxy.

Inside the graph, idempotent model calls are re-sent by the replica that made them (deployments/handles.Failover).
This module covers the hop in front of them: Serve's proxy -> an ingress replica. When the ingress replica serving a
request dies before it answers, Serve's proxy fails the request with a bare 500 and no body (at most once; see
ray/serve/_private/http_util.get_http_response_status). `ProxyFailover` runs in the proxy, through Serve's
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` hook (`proxy_middlewares`): it keeps the request's body and

- sends a request on a `RETRY` route (or a `KEYED` route that carries an `Idempotency-Key`) again, within its
  deadline; Serve's router has marked the dead replica and sends it to a live one, or waits for the replacement;
- answers any other request that got no answer (or one past its retries) with 503 and `Retry-After` in its front
  door's error shape (serve_app/core/shapes.py), never the bare 500.

A response that has started (a stream) cannot be taken back: a death mid-stream ends the stream. docs/operations.md
("Failures") has the per-route table and the measured figures; `ROUTES` is that table's source.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.core.logs import RequestIds, forward_to_serve_log, log_extra, scope_request_id

logger = logging.getLogger(__name__)

RETRY = "retry"  # idempotent: sent again when the replica serving it dies
KEYED = "keyed"  # changes state: sent again only with an Idempotency-Key header (the store answers a repeat once)
ONCE = "once"  # changes state, no key: never sent twice; a death before the answer is 503 in the route's shape

IDEMPOTENCY_HEADER = "idempotency-key"


IDEMPOTENCY_KEY_MAX = 255
IDEMPOTENCY_DOC = ("Optional. Any 1-255 visible ASCII characters that name this submission: a repeat with the same "
                   "key (a retry after a lost answer) returns the first submission's generations and queues nothing. "
                   "The service's proxy re-sends a keyed submission itself when the replica serving it dies.")


def idempotency_key(value: str | None) -> str | None:
    """The `Idempotency-Key` header of a queue submission, checked: 1 to 255 visible ASCII characters, or absent."""
    if value is None:
        return None
    if not 0 < len(value) <= IDEMPOTENCY_KEY_MAX or not all("!" <= ch <= "~" for ch in value):
        from serve_app.core.errors import BadRequest

        raise BadRequest(f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII characters")
    return value


@dataclass(frozen=True)
class Route:
    methods: tuple[str, ...]
    template: str  # the route's path, {name} for a path parameter
    policy: str
    why: str


ROUTES: tuple[Route, ...] = (
    Route(("POST",), "/v1/image/segment", RETRY, "segmentation and automatic masks: a pure function of the request"),
    Route(("POST",), "/api/ai/images/edit", RETRY, "Oxen image segmentation"),
    Route(("POST",), "/v1/sam3-image", RETRY, "Segmind segmentation"),
    Route(("POST",), "/sam3/concept_segment", RETRY, "Roboflow segmentation (an image_id only caches the embedding)"),
    Route(("POST",), "/sam3/visual_segment", RETRY, "Roboflow visual prompts (the logits cache is an overwrite)"),
    Route(("POST",), "/sam3/embed_image", RETRY, "Roboflow embeddings: encoding the same image twice caches one entry"),
    Route(("POST",), "/api/sam2_compatible", RETRY, "the HF Space's SAM2-compatible endpoint"),
    Route(("POST",), "/api/predict", RETRY, "the HF Space's predict endpoint"),
    Route(("POST",), "/api/ai/videos/generate", RETRY, "Oxen video segmentation in one call: its session is "
          "private to the call and closed (or expired) after it"),
    Route(("POST",), "/api/ai/queue", KEYED, "a queue submission: with an Idempotency-Key the store returns the "
          "first submission's generations for a repeat, so a retry never queues a second job"),
    Route(("POST",), "/v2/{slug}", KEYED, "a Segmind queue submission (as /api/ai/queue)"),
    Route(("POST",), "/v1/video/sessions", ONCE, "opens a session; a second open would hold a second session"),
    Route(("POST",), "/v1/video/sessions/{session_id}/prompts", ONCE, "changes the session's prompts"),
    Route(("POST",), "/v1/video/sessions/{session_id}/propagate", ONCE, "a stream of frames: tracking advances"),
    Route(("POST",), "/v1/video/sessions/{session_id}/reset", ONCE, "clears the session's prompts"),
    Route(("DELETE",), "/v1/video/sessions/{session_id}/objects/{object_id}", ONCE, "removes an object"),
    Route(("DELETE",), "/v1/video/sessions/{session_id}", ONCE, "closes the session (a repeat would be 404)"),
    Route(("DELETE",), "/api/ai/queue/{generation_id}", ONCE, "cancels a generation (a repeat would be 409)"),
    Route(("GET", "HEAD"), "*", RETRY, "every read: models, media, job status, events, session info, ops"),
)


def _pattern(template: str) -> re.Pattern:
    """The template anywhere at the end of the path: Serve mounts each application under its route prefix."""
    if template == "*":
        return re.compile(r"(?P<route>/.*)$")
    body = re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(template))
    return re.compile(rf"(?P<route>{body})$")


_COMPILED = [(route, _pattern(route.template)) for route in ROUTES]


def route_policy(method: str, path: str) -> tuple[str, str]:
    """(policy, the route's path without the application's prefix) for a request; ONCE for a path no route names."""
    for route, pattern in _COMPILED:
        if method in route.methods and (match := pattern.search(path)):
            return route.policy, match.group("route")
    return ONCE, path


SERVE_HINT_HEADERS = (b"x-request-timeout-seconds", b"x-request-disconnect-disabled")
RETRY_BACKOFF_S = (0.1, 0.25, 0.5, 1.0)  # before each retry; the last repeats


def _knob(field: str) -> float:
    """A SAM3_* knob as the proxy's environment sets it (Ray passes the environment it started with), or its default;
    the proxy serves every application, so it reads the environment, not one application's Config."""
    from serve_app.core.config import Config

    default = Config.model_fields[field].default
    try:
        return float(os.environ.get(f"SAM3_{field.upper()}", default))
    except ValueError:
        return float(default)


class ProxyFailover:
    """Pure ASGI middleware for Serve's HTTP proxy (see the module's docstring).

    Kept bodies: at most `replay_max_bytes` each and `budget_bytes` for all requests in flight in this proxy; past
    either a request runs once (its failure still answers 503 in its shape, not the bare 500).
    """

    def __init__(self, app: ASGIApp, retries: int | None = None, timeout_s: float | None = None,
                 replay_max_bytes: int | None = None, budget_bytes: int | None = None) -> None:
        self.app = app
        self.retries = int(_knob("failover_retries")) if retries is None else retries
        self.timeout_s = _knob("request_timeout_s") if timeout_s is None else timeout_s
        # a body larger than one request may be is passed through unkept (never re-sent); so is one past the budget
        self.replay_max_bytes = int(_knob("max_request_bytes")) if replay_max_bytes is None else replay_max_bytes
        self.budget_bytes = int(_knob("ingress_max_inflight_bytes")) if budget_bytes is None else budget_bytes
        # Serve's proxy obeys two headers meant for a front proxy (HAProxy): one turns its timeout off, the other
        # keeps a request running after its client left. From a client they are dropped, unless HAProxy is in front.
        self.strip_serve_headers = os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "0") in ("", "0")
        self.held = 0
        self.counts = {"retried": 0, "recovered": 0, "answered_503": 0}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self.strip_serve_headers:
            headers = [(k, v) for k, v in scope.get("headers", ()) if k.lower() not in SERVE_HINT_HEADERS]
            if scope["type"] == "websocket" or _long_lived(scope):
                # Serve's proxy would cut it at its request timeout (SAM3_REQUEST_TIMEOUT_S under `make serve`): a
                # live stream, an event stream or a propagation lasts as long as its client reads, bounded by the
                # route itself (its calls' own timeouts, the client's disconnect)
                headers.append((b"x-request-timeout-seconds", b"0"))
            scope = {**scope, "headers": headers}
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        policy, route = route_policy(scope.get("method", "GET"), scope.get("path", ""))
        if policy == KEYED and headers.get(IDEMPOTENCY_HEADER):
            policy = RETRY
        started = time.monotonic()
        deadline = started + _timeout(headers.get("x-request-timeout"), self.timeout_s)
        body, rest = (await self._keep(headers, receive)) if policy == RETRY and self.retries else (None, receive)
        try:
            await self._serve(scope, receive, send, route, body, rest, deadline)
        finally:
            if body is not None:
                self.held -= len(body)

    async def _keep(self, headers: dict, receive: Receive) -> tuple[bytes | None, Receive]:
        """The whole body, kept for a retry; or (None, a receive that replays what was read) when it is too large."""
        declared = headers.get("content-length", "")
        if declared.isdigit() and (int(declared) > self.replay_max_bytes
                                   or self.held + int(declared) > self.budget_bytes):
            return None, receive
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before it sent the body
                return None, _replaying([message], receive)
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.replay_max_bytes or self.held + size > self.budget_bytes:  # passed on as it comes
                return None, _replaying([{"type": "http.request", "body": b"".join(chunks), "more_body": more}],
                                        receive)
            if not more:
                break
        body = b"".join(chunks)
        self.held += len(body)
        return body, receive

    async def _serve(self, scope, receive, send, route, body, rest, deadline) -> None:
        gone = asyncio.Event()  # the client disconnected: nothing more is sent, nothing is retried
        watcher = None
        if body is not None:
            async def watch() -> None:
                while (await rest())["type"] != "http.disconnect":
                    pass
                gone.set()

            watcher = asyncio.ensure_future(watch())
        attempt = 0
        try:
            while True:
                state: dict = {"started": False, "refusal": None}

                async def tracked(message: Message) -> None:
                    if message["type"] == "http.response.start":
                        state["started"] = True
                        if message.get("status") == 503 and not _json(message):
                            state["refusal"] = message  # Serve's own backpressure answer, plain text: ours instead
                            return
                    if state["refusal"] is not None:
                        if message["type"] == "http.response.body" and not message.get("more_body", False):
                            await _refused(route, scope, send, state["refusal"])
                        return
                    await send(message)

                attempt_scope, attempt_receive = scope, rest
                if body is not None:
                    attempt_receive = _once(body, gone)
                    if attempt:
                        attempt_scope = _with_timeout(scope, deadline - time.monotonic())
                error = None
                try:
                    await self.app(attempt_scope, attempt_receive, tracked)
                except Exception as exc:  # noqa: BLE001 - answered below in the route's shape, or re-raised
                    error = exc
                if state["started"] or gone.is_set():
                    if attempt and state["started"]:
                        self.counts["recovered"] += 1
                    if error is not None and not state["started"]:
                        return
                    if error is not None:
                        raise error
                    return
                pause = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
                if body is None or attempt >= self.retries or deadline - time.monotonic() <= pause:
                    self.counts["answered_503"] += 1
                    logger.warning("%s %s got no answer from its replica (%s); answered 503 after %d tries",
                                   scope.get("method"), scope.get("path"), error or "it died", attempt + 1,
                                   extra=log_extra(scope))
                    await _unavailable(route, scope, send, attempt + 1)
                    return
                attempt += 1
                self.counts["retried"] += 1
                logger.info("%s %s: its replica died before answering; sending it again (try %d)",
                            scope.get("method"), scope.get("path"), attempt + 1, extra=log_extra(scope))
                await asyncio.sleep(pause)
        finally:
            if watcher is not None:
                watcher.cancel()


LONG_LIVED = (re.compile(r"/api/events$"), re.compile(r"/v1/video/sessions/[^/]+/propagate$"))


def _long_lived(scope: Scope) -> bool:
    """A response that streams for as long as its client reads: Oxen's event stream, a session's propagation."""
    path = scope.get("path", "")
    return any(pattern.search(path) for pattern in LONG_LIVED)


def _timeout(value: str | None, default: float) -> float:
    try:
        seconds = float(value) if value is not None else default
    except ValueError:
        return default
    return min(seconds, default) if seconds > 0 and seconds == seconds else default


def _with_timeout(scope: Scope, seconds: float) -> Scope:
    """The scope again, its X-Request-Timeout what is left of the deadline (the ingress starts its clock anew)."""
    headers = [(k, v) for k, v in scope.get("headers", ()) if k.lower() != b"x-request-timeout"]
    headers.append((b"x-request-timeout", f"{max(seconds, 0.001):.3f}".encode()))
    return {**scope, "headers": headers}


def _once(body: bytes, gone: asyncio.Event) -> Receive:
    """A receive for one try: the kept body, then (once the client leaves) the disconnect."""
    from serve_app.core.http import _replay

    async def disconnect() -> Message:
        await gone.wait()
        return {"type": "http.disconnect"}

    return _replay(body, disconnect)


def _replaying(first: list[Message], receive: Receive) -> Receive:
    queued = list(first)

    async def replay() -> Message:
        if queued:
            return queued.pop(0)
        return await receive()

    return replay


def _json(start: Message) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"application/json") for k, v in start.get("headers", ()))


async def _refused(route: str, scope: Scope, send: Send, start: Message) -> None:
    """Serve's proxy refused the request (the ingress' queue, `max_queued_requests`, is full): the same 503 and
    Retry-After, in the route's error shape rather than Serve's plain text."""
    from serve_app.core.admission import Overloaded

    retry = next((v for k, v in start.get("headers", ()) if k.lower() == b"retry-after"), b"1")
    seconds = int(retry) if retry.isdigit() else 1
    await _answer(route, scope, send, Overloaded("the service's request queue is full; retry shortly",
                                                 retry_after_s=seconds))


async def _unavailable(route: str, scope: Scope, send: Send, tries: int) -> None:
    from serve_app.core.errors import ServiceUnavailable

    await _answer(route, scope, send, ServiceUnavailable(
        f"the replica serving this request died before it answered ({tries} {'try' if tries == 1 else 'tries'}); "
        "retry"))


async def _answer(route: str, scope: Scope, send: Send, exc) -> None:
    """`exc` in the shape of the front door that owns `route` (serve_app/core/http.error_response)."""
    from serve_app.core.http import _closed, error_response

    try:
        await error_response(route, exc, scope_request_id(scope))(scope, _closed, send)
    except Exception as failure:  # noqa: BLE001 - the client is gone: nobody to answer
        logger.debug("could not answer %s: %s", scope.get("path"), failure)


def proxy_middlewares() -> list:
    """Serve's RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH hook: the middlewares Serve's HTTP proxy wraps itself in
    (the last is the outermost: request ids first, serve_app/core/logs.py), and our lines into the proxy's log."""
    from starlette.middleware import Middleware

    level = os.environ.get("SAM3_LOG_LEVEL", "").strip().upper()
    forward_to_serve_log(level if level in ("DEBUG", "INFO", "WARNING", "ERROR") else "INFO")
    return [Middleware(ProxyFailover), Middleware(RequestIds)]


PROXY_CALLBACK = "serve_app.core.failover:proxy_middlewares"  # set before Ray starts (serve_app.main, the tests)


PROXY_KNOBS = ("failover_retries", "request_timeout_s", "max_request_bytes", "ingress_max_inflight_bytes",
               "log_level")


def enable_proxy_failover(config: object | None = None) -> None:
    """Before Ray starts (it passes the environment to every process it starts): Serve's proxy loads the middleware.
    An operator's own RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH is left alone (and this failover is then off).
    With a `Config` (`sam3-serve`, whose flags and file may set what the environment does not), the knobs the proxy
    reads (PROXY_KNOBS) are exported as SAM3_* variables, so the proxy follows the same configuration."""
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)
    for field in PROXY_KNOBS if config is not None else ():
        os.environ[f"SAM3_{field.upper()}"] = str(getattr(config, field))
