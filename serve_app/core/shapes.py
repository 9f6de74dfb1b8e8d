"""Each front door's error body, by path prefix: one table, light enough for Serve's HTTP proxy to import.

The provider modules (serve_app/protocols) own their routes; their error shapes live here so that the proxy's
failover middleware (serve_app/core/failover.py) answers a request it could not get served in the same shape as the
route would have, without importing the routes (and torch) into the proxy.
"""

from __future__ import annotations

from serve_app.core.errors import Sam3Error


def oxen_error_body(exc: Sam3Error) -> dict:
    """Oxen's error shape: {"status": "error", "status_message": <code>, "status_description": <message>, "error"}."""
    code = {"not_found": "resource_not_found", "internal_error": "internal_server_error"}.get(exc.code, exc.code)
    error: dict = {"type": code, "title": exc.message}
    if exc.details is not None:
        error["details"] = exc.details
    return {"status": "error", "status_message": code, "status_description": exc.message, "error": error}


def segmind_error_body(exc: Sam3Error) -> dict:
    """Segmind's error shape: {"error": message} (its SDK reads `error`), plus a stable `code`."""
    return {"error": exc.message, "code": exc.code}


def roboflow_error_body(exc: Sam3Error) -> dict:
    """Roboflow's inference server answers errors as {"message": "..."}."""
    return {"message": exc.message}


def hf_space_error_body(exc: Sam3Error) -> dict:
    """The Space's error shape: {"success": false, "error": message, "error_type": code}."""
    return {"success": False, "error": exc.message, "error_type": exc.code}


SEGMIND_PATH = "/v1/sam3-image"  # Segmind's model slug route (serve_app/protocols/segmind.py)

# path prefix -> renderer; the longest prefix that matches wins, the native shape is the fallback
SHAPES = (
    ("/api/ai", oxen_error_body),
    ("/api/media", oxen_error_body),  # media URLs need no key: their id is the capability
    ("/api/events", oxen_error_body),
    (SEGMIND_PATH, segmind_error_body),
    ("/v2/", segmind_error_body),  # Segmind's queue
    ("/sam3/", roboflow_error_body),
    ("/api/predict", hf_space_error_body),
    ("/api/sam2_compatible", hf_space_error_body),
)
