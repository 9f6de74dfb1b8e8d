"""Request ids and log lines: the X-Request-ID every answer carries, and logs a log stack can read (text or JSON).

Ray Serve 2.60 already gives each HTTP request an id: its proxy reads `x-request-id`, makes one when none came,
puts it on the answer, hands it to the replica (`serve.context._get_serve_request_context().request_id`, on every
handle call down the graph too) and writes it in its access log lines. What it lacks, this module adds:

- `RequestIds`, the outermost middleware of Serve's HTTP proxy (loaded with the failover middleware,
  serve_app/core/failover.py): a client's id that is not 1 to 128 characters of `[A-Za-z0-9._:+=/@-]` (an
  over-long one, quotes, non-ASCII, a byte Serve cannot decode, a second header) is replaced with a new one before
  Serve sees it, so Serve logs and returns exactly the id we return; and every answer gets the header, the proxy
  middleware's own 503s included.
- `ToServeLog`: our loggers (`serve_app.*`, `deployments.*`) write to Serve's log of the replica (or proxy) they run
  in, with the request id; Serve configures only its own logger `ray.serve`, so their lines went nowhere or to
  stderr without an id.
- `JsonFormatter` for the driver (`make serve`), with the keys Ray's JSON logs use; `serve_logging_config` is the
  `LoggingConfig` of every Serve component (`SAM3_LOG_FORMAT`, `SAM3_LOG_LEVEL`).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "x-request-id"  # Serve's own header (ray.serve._private.constants.SERVE_HTTP_REQUEST_ID_HEADER)
REQUEST_ID_MAX = 128
_SAFE_ID = re.compile(r"[A-Za-z0-9._:+=/@-]{1,%d}" % REQUEST_ID_MAX)
_HEADER = REQUEST_ID_HEADER.encode()


def valid_request_id(value: str | bytes | None) -> str | None:
    """`value` if it is a request id we repeat in headers and logs: 1-128 of letters, digits and `._:+=/@-`."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if value is not None and _SAFE_ID.fullmatch(value) else None


def new_request_id() -> str:
    """A fresh id, in the form Serve makes its own (a UUID4)."""
    return str(uuid.uuid4())


def scope_request_id(scope: Scope) -> str | None:
    """The request's id as the proxy passed it on (its `x-request-id` header), if it is a valid one."""
    return next((valid_request_id(v) for k, v in scope.get("headers", ()) if k.lower() == _HEADER), None)


class RequestIds:
    """Pure ASGI middleware, outermost in Serve's HTTP proxy: one valid `x-request-id` in, the same one out.

    The request leaves with exactly one `x-request-id` header: the client's, when it is valid (`valid_request_id`),
    otherwise a new one (a hostile id is never echoed or logged). Serve's own RequestIdMiddleware, inside, then finds
    it and uses it: the proxy's and the replicas' log lines and the replica's request context carry the same id.
    Every HTTP answer's start carries it once, whoever wrote the answer. A WebSocket has no answer headers after the
    upgrade; its id is still checked, for the logs.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = scope_request_id(scope) or new_request_id()
        value = request_id.encode()
        headers = [(k, v) for k, v in scope.get("headers", ()) if k.lower() != _HEADER]
        scope = {**scope, "headers": [*headers, (_HEADER, value)]}
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", ()) if k.lower() != _HEADER]
                message = {**message, "headers": [*kept, (_HEADER, value)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def log_extra(scope: Scope) -> dict:
    """`extra=` for a log line about this request outside Serve's request context (the proxy's middlewares)."""
    request_id = scope_request_id(scope)
    return {"request_id": request_id} if request_id else {}


# ---------------------------------------------------------------- our loggers into Serve's logs

SERVE_LOGGER = "ray.serve"  # the one logger Serve configures in each of its processes (its log file, stderr)
OUR_LOGGERS = ("serve_app", "deployments")  # logging.getLogger(__name__) throughout the service


class RequestIdFilter(logging.Filter):
    """Sets `record.request_id` from `source` (the request being served) when the line does not carry one."""

    def __init__(self, source: Callable[[], str | None]) -> None:
        super().__init__()
        self.source = source

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None):
            return True
        try:
            request_id = self.source()
        except Exception:  # noqa: BLE001 - outside a request (start-up, a background loop): no id
            request_id = None
        if request_id:
            record.request_id = request_id
        return True


class ToServeLog(logging.Handler):
    """Hands our loggers' records to the handlers of Serve's logger in this process: the replica's (or proxy's) log
    file under the session's logs/serve/, and stderr, formatted as Serve's own lines (text or JSON) and with Serve's
    context (request id, route, application, deployment, replica)."""

    def emit(self, record: logging.LogRecord) -> None:
        serve_logger = logging.getLogger(SERVE_LOGGER)
        if serve_logger.handlers:
            serve_logger.handle(record)
        elif record.levelno >= logging.WARNING and logging.lastResort is not None:
            logging.lastResort.handle(record)


def forward_to_serve_log(level: str | int = "INFO", request_id: Callable[[], str | None] | None = None,
                         loggers: Iterable[str] = OUR_LOGGERS) -> None:
    """In a Serve replica or proxy: our loggers write at `level` and above into Serve's log (see ToServeLog), each
    line with the id `request_id()` names; idempotent (a second call replaces the first)."""
    handler = ToServeLog()
    if request_id is not None:
        handler.addFilter(RequestIdFilter(request_id))
    for name in loggers:
        target = logging.getLogger(name)
        for old in [h for h in target.handlers if isinstance(h, ToServeLog)]:
            target.removeHandler(old)
        target.addHandler(handler)
        target.setLevel(level)
        target.propagate = False  # once, in Serve's log; not again through a handler of the root logger


# ---------------------------------------------------------------- formats



class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the keys of Ray's JSON logs (ray._common.formatters.JSONFormatter), so that the
    driver's lines and the replicas' parse alike; extras a line was logged with are kept."""

    _STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        line: dict = {
            "asctime": self.formatTime(record), "levelname": record.levelname, "name": record.name,
            "message": record.getMessage(), "filename": record.filename, "lineno": record.lineno,
            "process": record.process, "timestamp_ns": int(record.created * 1e9),
        }
        line.update((k, v) for k, v in vars(record).items() if k not in self._STANDARD)
        if "_ray_timestamp_ns" in line:  # Ray's own stamp on every record, under the name its formatter gives it
            line["timestamp_ns"] = line.pop("_ray_timestamp_ns")
        if record.exc_info:
            line["exc_text"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def driver_formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure_driver_logging(log_format: str = "text", level: str | int = "INFO",
                             also: Iterable[str] = ()) -> None:
    """The driver's (`make serve`) lines: the root logger at `level` in `log_format`; with json, the handlers of the
    loggers named in `also` (Ray's `ray`, Serve's `ray.serve`, which print on their own) get the same formatter."""
    formatter = driver_formatter(log_format)
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(formatter)
    root.setLevel(level)
    if log_format == "json":
        for name in also:
            for handler in logging.getLogger(name).handlers:
                handler.setFormatter(formatter)


def serve_logging_config(log_format: str = "text", level: str | int = "INFO", **own: object) -> dict:
    """Serve's `LoggingConfig` (as a dict) for a deployment, `serve.start` (proxy, controller) or a Serve config file:
    the encoding and level of SAM3_LOG_FORMAT and SAM3_LOG_LEVEL, each line naming its logger; `own` keeps a
    deployment's own settings (`enable_access_log`)."""
    return {**own, "encoding": "JSON" if log_format == "json" else "TEXT", "log_level": level,
            "additional_log_standard_attrs": ["name"]}
