"""HTTP plumbing shared by every route: one error mapping, registered once, rendered in each provider's shape."""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, QueryParams
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.core.admission import (
    TIMEOUT_HEADER,
    Admission,
    parse_timeout,
    reset_deadline,
    set_deadline,
)
from serve_app.core.auth import ANONYMOUS, Authenticator, bearer
from serve_app.core.config import Config
from serve_app.core.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    Sam3Error,
    TooManyRequests,
    Unauthorized,
    ValidationFailed,
)
from serve_app.core.logs import scope_request_id
from serve_app.core.shapes import SHAPES
from serve_app.core.stats import release_memory

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 429 or 503 that names no wait of its own tells the client to wait

# path prefix -> renderer of (error) -> body; providers register theirs; the native shape is the fallback
ErrorRenderer = Callable[[Sam3Error], dict]
_RENDERERS: list[tuple[str, ErrorRenderer]] = sorted(SHAPES, key=lambda item: -len(item[0]))


def native_error_body(exc: Sam3Error, request_id: str | None = None) -> dict:
    """The native error shape, for every path no provider claims: {"error": {"code", "message", "details"?,
    "request_id"?}}; `request_id` is the request's X-Request-ID (serve_app/core/logs.py)."""
    error: dict = {"code": exc.code, "message": exc.message}
    if exc.details is not None:
        error["details"] = exc.details
    if request_id:
        error["request_id"] = request_id
    return {"error": error}


def register_error_shape(prefix: str, renderer: ErrorRenderer) -> None:
    _RENDERERS.append((prefix, renderer))
    _RENDERERS.sort(key=lambda item: -len(item[0]))


def route_path(request: Request) -> str:
    """The path inside the app (Serve mounts apps under a route prefix, passed as root_path)."""
    path, root = request.url.path, request.scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class SafeJSONResponse(JSONResponse):
    """JSON that any string a client sent can pass through: a lone surrogate (valid JSON, not UTF-8) is escaped."""

    def render(self, content: object) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


RETRY_STATUSES = (429, 503)  # answers that always say when to come back


def error_response(path: str, exc: Sam3Error, request_id: str | None = None) -> JSONResponse:
    """The error in the shape of the front door that owns `path`; a 429 or 503 carries Retry-After. The request's id
    goes into the native body only: no provider's error shape has a field for it (the header carries it anyway)."""
    renderer = next((r for prefix, r in _RENDERERS if path.startswith(prefix)), None)
    body = native_error_body(exc, request_id) if renderer is None else renderer(exc)
    response = SafeJSONResponse(status_code=exc.status_code, content=body)
    if exc.status_code in RETRY_STATUSES:
        response.headers["Retry-After"] = str(max(1, int(getattr(exc, "retry_after_s", None) or RETRY_AFTER_S)))
    return response


def _describe(errors: list[dict]) -> tuple[str, list[dict]]:
    details = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        details.append({"field": loc or "body", "message": err.get("msg", "invalid")})
    text = "; ".join(f"{d['field']}: {d['message']}" for d in details[:5])
    return text, details


def validation_error_message(errors: list[dict]) -> str:
    return _describe(errors)[0]


def validation_error(exc: RequestValidationError) -> Sam3Error:
    errors = list(exc.errors())
    if any(err.get("type") == "json_invalid" for err in errors):
        return BadRequest("request body is not valid JSON")
    text, details = _describe(errors)
    return ValidationFailed(f"invalid request: {text}", details=details)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Sam3Error)
    async def _sam3(request: Request, exc: Sam3Error) -> JSONResponse:
        if exc.status_code >= 500:
            logger.error("%s %s -> %s: %s", request.method, request.url.path, exc.status_code, exc.message)
        return error_response(route_path(request), exc, scope_request_id(request.scope))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(route_path(request), validation_error(exc), scope_request_id(request.scope))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        from starlette.routing import Match

        err: Sam3Error
        headers = dict(exc.headers or {})  # Starlette's own: 405 carries `Allow`
        if exc.status_code == 404:
            err = NotFound(f"no route {request.method} {request.url.path}")
        elif exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's answer when json.loads fails with other than JSONDecodeError (bad UTF-8, deep nesting...)
            err = BadRequest("request body could not be parsed as JSON (not UTF-8, too deeply nested, or a huge number)")
        elif exc.status_code == 405:
            # Starlette's `Allow` names the methods of the first route on the path only; every route on it counts
            bare = {"type": "http", "path": request.scope["path"], "root_path": request.scope.get("root_path", ""),
                    "headers": [], "query_string": b""}
            routes = request.app.router.routes
            methods = [
                method for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
                if any(route.matches({**bare, "method": method})[0] == Match.FULL for route in routes)
            ]
            if methods:
                headers["Allow"] = ", ".join(methods)
            err = Sam3Error(f"{request.method} is not allowed on {request.url.path}; allowed: {headers.get('Allow')}")
            err.status_code, err.code = 405, "method_not_allowed"
        else:
            err = Sam3Error(str(exc.detail))
            err.status_code = exc.status_code
            err.code = "http_error"
        response = error_response(route_path(request), err, scope_request_id(request.scope))
        response.headers.update(headers)
        return response


VIDEO_UPLOADS = ("/v1/video/sessions", "/api/ai/videos/generate", "/api/ai/queue")  # routes that carry a video
RAW_VIDEO_TYPES = ("video/", "application/octet-stream")


def body_limit(path: str, config: Config, content_type: str = "") -> tuple[int, str]:
    """Largest body for a route and the knob that sets it: video uploads may carry a whole video (as base64 too)."""
    if path.rstrip("/") in VIDEO_UPLOADS:
        if content_type.split(";")[0].strip().lower().startswith(RAW_VIDEO_TYPES):
            return max(config.video_max_bytes, 1024), "SAM3_VIDEO_MAX_BYTES"
        if config.video_max_bytes * 4 // 3 + 65536 > config.max_request_bytes:
            return config.video_max_bytes * 4 // 3 + 65536, "SAM3_VIDEO_MAX_BYTES"
    return config.max_request_bytes, "SAM3_MAX_REQUEST_BYTES"


# ---------------------------------------------------------------- keys, checked before anything else

KeyTransport = str  # "bearer", "header:<name>", "query:<name>" or "body:<field>" (a top-level JSON field)


@dataclass(frozen=True)
class KeyRule:
    """How a provider's clients send their key on the routes under `prefix`; `how` is said in the 401."""

    prefix: str
    transports: tuple[KeyTransport, ...]
    how: str


_KEY_RULES: list[KeyRule] = []
_OPEN_PATHS: set[str] = set()  # exact paths under a keyed prefix that need no key


def register_key_rule(prefix: str, transports: tuple[KeyTransport, ...], how: str) -> None:
    """Routes under `prefix` need a key (when keys are configured); the longest registered prefix wins."""
    _KEY_RULES[:] = [r for r in _KEY_RULES if r.prefix != prefix] + [KeyRule(prefix, transports, how)]
    _KEY_RULES.sort(key=lambda rule: -len(rule.prefix))


def register_open_path(path: str) -> None:
    _OPEN_PATHS.add(path)


_ADMITTED: set[str] = set()  # exact paths of the image model routes: deadline and admission (core/admission.py)
_admission: dict[str, Admission | None] = {"current": None}


def register_admitted_path(path: str) -> None:
    """POSTs to `path` run the image model: they get a deadline and pass admission control before they run."""
    _ADMITTED.add(path.rstrip("/") or "/")


def set_admission(admission: Admission | None) -> None:
    """The ingress replica's admission controller (None: every request is let through, as in unit tests)."""
    _admission["current"] = admission


def admitted_path(path: str) -> bool:
    return (path.rstrip("/") or "/") in _ADMITTED


def key_rule(path: str) -> KeyRule | None:
    if path in _OPEN_PATHS:
        return None
    return next((rule for rule in _KEY_RULES if path.startswith(rule.prefix)), None)


def _header_key(rule: KeyRule, headers: Headers, query: QueryParams) -> str | None:
    for transport in rule.transports:
        kind, _, name = transport.partition(":")
        value = None
        if kind == "bearer":
            value = bearer(headers.get("authorization"))
        elif kind == "header":
            value = headers.get(name)
        elif kind == "query":
            value = query.get(name)
        if value:
            return value
    return None


def _body_key(rule: KeyRule, body: bytes) -> str | None:
    fields = [t.partition(":")[2] for t in rule.transports if t.startswith("body:")]
    try:
        data = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None  # not JSON: it carries no key, so the caller has none
    if not isinstance(data, dict):
        return None
    return next((data[f] for f in fields if isinstance(data.get(f), str) and data[f]), None)


TRIM_AFTER_BYTES = 8 * 1024 * 1024


class _TooLarge(Exception):
    """Raised from `receive` once a body passes its limit; the gate answers 413 in the route's shape."""


class _Busy(Exception):
    """Raised from `receive` when a body's next chunk would pass the replica's in-flight budget: 429."""




class InflightBudget:
    """Bytes of request bodies one replica holds at once (SAM3_INGRESS_MAX_INFLIGHT_BYTES).

    A request reserves its Content-Length before a byte is read, and a chunked one reserves each chunk as it
    arrives; the reservation ends with the request. A reservation that would pass the budget while other requests
    hold some of it is refused (429 with Retry-After); one with the replica to itself always gets in, so a
    request at its own limit is never refused on an idle replica. Memory for bodies is then at most
    max(budget, one request's limit). The gate and the routes run on one event loop: no lock is needed.
    """

    def __init__(self) -> None:
        self.held = 0
        self.refused = 0

    def reserve(self, size: int, limit: int, mine: int = 0) -> bool:
        """Reserve `size` more bytes for a request that holds `mine` already; False (counted) if over `limit`."""
        if size <= 0:
            return True
        if self.held - mine > 0 and self.held + size > limit:
            self.refused += 1
            return False
        self.held += size
        return True

    def release(self, size: int) -> None:
        self.held -= size


def busy(budget: InflightBudget, size: str, limit: int) -> TooManyRequests:
    return TooManyRequests(
        f"the service is busy: this replica holds {budget.held} bytes of request bodies in flight and this request "
        f"brings {size} more; the limit is {limit} (SAM3_INGRESS_MAX_INFLIGHT_BYTES). Retry in {RETRY_AFTER_S} s.",
        retry_after_s=RETRY_AFTER_S,
    )


class Gate:
    """Pure ASGI middleware in front of every route: the key first, then the body limit while the body is read.

    Keys: a route under a registered prefix answers 401 (in its provider's shape) before any byte of the body is
    parsed. A provider whose key may travel in the JSON body (Roboflow) has its body read here, within the limit,
    when no header or query key came, and replayed to the route. Body limits hold for chunked uploads too: the
    bytes are counted as they arrive and the read stops at the first byte over the limit.
    """

    def __init__(self, app: ASGIApp, config: Callable[[], Config]) -> None:
        self.app = app
        self.config = config
        self._auth: tuple[tuple[str, ...], Authenticator] | None = None
        self.inflight = InflightBudget()

    def _authenticator(self, config: Config) -> Authenticator:
        keys = tuple(config.api_keys)
        if self._auth is None or self._auth[0] != keys:
            self._auth = (keys, Authenticator(list(keys)))
        return self._auth[1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        config = self.config()
        path = _scope_path(scope)
        headers = Headers(scope=scope)
        max_bytes, knob = body_limit(path, config, headers.get("content-type", ""))

        def too_large(size: str) -> PayloadTooLarge:
            return PayloadTooLarge(f"request body is {size} bytes; the limit is {max_bytes} ({knob})")

        length = headers.get("content-length")
        declared = int(length) if length is not None and length.strip().isdigit() else None
        oversized = declared is not None and declared > max_bytes  # answered 413 once the key has been checked
        budget, limit = self.inflight, config.ingress_max_inflight_bytes
        received = reserved = 0

        async def limited() -> Message:
            nonlocal received, reserved
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise _TooLarge
                if received > reserved:  # a chunked body (or one longer than it said) reserves as it arrives
                    if not budget.reserve(received - reserved, limit, mine=reserved):
                        raise _Busy
                    reserved = received
            return message

        def admit() -> bool:
            """Reserve the declared body before reading it; False: the budget is full (the caller answers 429)."""
            nonlocal reserved
            if declared and budget.reserve(declared, limit):
                reserved = declared
            return not declared or reserved == declared

        tenant = ANONYMOUS
        try:
            rule = key_rule(path)
            auth = self._authenticator(config)
            if rule is not None and auth.enabled:
                key = _header_key(rule, headers, QueryParams(scope.get("query_string", b"")))
                inner_receive = limited
                if key is None and any(t.startswith("body:") for t in rule.transports):
                    # the key is in the body: it must be read (within both limits) before the key is known
                    if oversized:  # a body too large to read holds a key nobody can check: the limit answers
                        await self._answer(path, too_large(str(declared)), scope, receive, send)
                        return
                    if not admit():
                        await self._busy(path, budget, str(declared), limit, scope, receive, send)
                        return
                    try:
                        body = await _read_all(limited)
                    except _TooLarge:
                        await self._answer(path, too_large(f"more than {max_bytes}"), scope, receive, send)
                        return
                    except _Busy:
                        await self._busy(path, budget, f"at least {received}", limit, scope, receive, send)
                        return
                    key, inner_receive = _body_key(rule, body), _replay(body, receive)
                try:
                    tenant = auth.tenant(key, rule.how)
                except Unauthorized as exc:
                    await self._answer(path, exc, scope, receive, send)
                    return
            else:
                inner_receive = limited
            if oversized:  # keys first: a caller without a valid key learns nothing of the limits
                await self._answer(path, too_large(str(declared)), scope, receive, send)
                return
            if not reserved and not admit():  # keys first: only a request with a valid key gets this far
                await self._busy(path, budget, str(declared), limit, scope, receive, send)
                return
            refused = lambda: busy(budget, f"at least {received}", limit)  # noqa: E731
            if scope.get("method") == "POST" and admitted_path(path):
                await self._admitted(path, tenant, headers, config, scope, inner_receive, send, too_large, max_bytes,
                                     refused)
            else:
                await self._run(path, scope, inner_receive, send, too_large, max_bytes, refused)
        finally:
            budget.release(reserved)
            if received > TRIM_AFTER_BYTES:
                # A refused or failed request's body can sit in a reference cycle (exception -> traceback -> frame)
                # until the collector's next full pass: free it now, then give the heap back to the OS.
                gc.collect()
                release_memory()

    async def _admitted(self, path, tenant, headers, config, scope, receive, send, too_large, max_bytes,
                        refused) -> None:
        """An image model request: its deadline set for the whole graph, and a slot of the admission controller held
        while it runs. A refusal (429 over the key's own limit, 503 when it cannot start in time) is answered here,
        before the route parses a byte of the body."""
        try:
            budget_s = parse_timeout(headers.get(TIMEOUT_HEADER), config.request_timeout_s)
        except Sam3Error as exc:
            await self._answer(path, exc, scope, receive, send)
            return
        deadline = time.time() + budget_s
        # the whole body first (within its limits), so that a slow upload never holds a slot of the model
        try:
            body = await _read_all(receive)
        except _TooLarge:
            await self._answer(path, too_large(f"more than {max_bytes}"), scope, _closed, send)
            return
        except _Busy:
            await self._answer(path, refused(), scope, _closed, send)
            return
        receive = _replay(body, receive)
        token = set_deadline(deadline)
        try:
            admission = _admission["current"]
            ticket = None
            if admission is not None:
                try:
                    ticket = await admission.enter(tenant, deadline)
                except Sam3Error as exc:  # counted in the admission's stats and metrics; logged by _answer
                    await self._answer(path, exc, scope, receive, send)
                    return
            try:
                await self._run(path, scope, receive, send, too_large, max_bytes, refused)
            finally:
                if ticket is not None:
                    ticket.release()
        finally:
            reset_deadline(token)

    async def _run(self, path, scope, receive, send, too_large, max_bytes, refused) -> None:
        """Run the route; if its body read passed the size limit or the in-flight budget, its answer (whatever it
        made of the error) is the 413 or the 429."""
        state: dict = {"error": None, "started": False}

        async def guarded_receive() -> Message:
            try:
                return await receive()
            except _TooLarge:
                state["error"] = too_large(f"more than {max_bytes}")
            except _Busy:
                state["error"] = refused()
            raise type(state["error"])(state["error"].message)

        async def answer_error() -> None:
            state["started"] = True
            await error_response(path, state["error"], scope_request_id(scope))(scope, _closed, send)

        async def guarded_send(message: Message) -> None:
            if state["error"] is not None:
                if not state["started"]:
                    await answer_error()
                return
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if state["error"] is None or state["started"]:
                raise
            await answer_error()

    async def _answer(self, path: str, exc: Sam3Error, scope: Scope, receive: Receive, send: Send) -> None:
        """A refusal of the gate (401, 413, 429, 503, a bad X-Request-Timeout): counted elsewhere; a flood of them
        would flood the log above DEBUG."""
        logger.debug("%s %s %s: %s", exc.status_code, scope.get("method"), path, exc.message)
        await error_response(path, exc, scope_request_id(scope))(scope, receive, send)

    async def _busy(self, path, budget, size, limit, scope, receive, send) -> None:
        logger.warning("429 %s: %s bytes of request bodies in flight, limit %s", path, budget.held, limit)
        await error_response(path, busy(budget, size, limit), scope_request_id(scope))(scope, receive, send)




async def _read_all(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the route the body read already, then the client's further messages (disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _closed() -> Message:
    return {"type": "http.disconnect"}


def _scope_path(scope: Scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def install_gate(app: FastAPI, config: Callable[[], Config]) -> None:
    """Keys first, then body limits while reading, on every route of the app (see Gate)."""
    app.add_middleware(Gate, config=config)
