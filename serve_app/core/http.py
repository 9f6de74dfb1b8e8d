"""HTTP plumbing shared by every route: one error mapping, registered once, rendered in each provider's shape."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.core.config import Config
from serve_app.core.errors import BadRequest, NotFound, PayloadTooLarge, Sam3Error, ValidationFailed

logger = logging.getLogger(__name__)

# path prefix -> renderer of (error) -> body; providers register theirs; the native shape is the fallback
ErrorRenderer = Callable[[Sam3Error], dict]
_RENDERERS: list[tuple[str, ErrorRenderer]] = []


def native_error_body(exc: Sam3Error) -> dict:
    """The native error shape, for every path no provider claims: {"error": {"code", "message", "details"?}}."""
    error: dict = {"code": exc.code, "message": exc.message}
    if exc.details is not None:
        error["details"] = exc.details
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


def error_response(path: str, exc: Sam3Error) -> JSONResponse:
    renderer = next((r for prefix, r in _RENDERERS if path.startswith(prefix)), native_error_body)
    return SafeJSONResponse(status_code=exc.status_code, content=renderer(exc))


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
        return error_response(route_path(request), exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(route_path(request), validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err: Sam3Error
        if exc.status_code == 404:
            err = NotFound(f"no route {request.method} {request.url.path}")
        elif exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's answer when json.loads fails with other than JSONDecodeError (bad UTF-8, deep nesting...)
            err = BadRequest("request body could not be parsed as JSON (not UTF-8, too deeply nested, or a huge number)")
        else:
            err = Sam3Error(str(exc.detail))
            err.status_code = exc.status_code
            err.code = "http_error"
        return error_response(route_path(request), err)


VIDEO_ROUTES = ("/v1/video/", "/api/ai/videos/", "/api/ai/queue")


def body_limit(path: str, config: Config) -> tuple[int, str]:
    """Largest body for a route and the knob that sets it: video routes may carry a whole video (as base64 too)."""
    if path.startswith(VIDEO_ROUTES) and config.video_max_bytes * 4 // 3 + 65536 > config.max_request_bytes:
        return config.video_max_bytes * 4 // 3 + 65536, "SAM3_VIDEO_MAX_BYTES"
    return config.max_request_bytes, "SAM3_MAX_REQUEST_BYTES"


def install_body_limit(app: FastAPI, config: Callable[[], Config]) -> None:
    """Refuse bodies over the route's limit by their Content-Length, before reading them."""

    @app.middleware("http")
    async def _limit(request: Request, call_next):
        max_bytes, knob = body_limit(route_path(request), config())
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            return error_response(
                route_path(request),
                PayloadTooLarge(f"request body is {int(length)} bytes; the limit is {max_bytes} ({knob})"),
            )
        return await call_next(request)
