"""What the OpenAPI schema says about errors and raw bodies: one helper per concern, used by every route decorator.

Every route lists the statuses its code paths can answer, each with the error body of its provider's shape (the
renderer `register_error_shape` chose for its path), so generated clients and schema-driven fuzzers see the truth:

    @router.get("/v1/stats", responses=error_responses(NativeError, 401, 429, 503, 504))
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# what each status means on this service; a route may say it more precisely with `descriptions`
DESCRIPTIONS: dict[int, str] = {
    400: "Bad request: the body is not JSON, an image or video cannot be fetched or decoded, or a prompt does not "
    "fit the image.",
    401: "Missing or invalid API key (when the server has keys configured).",
    404: "Not found: an unknown model, id, session or object, or one that belongs to another API key.",
    409: "Conflict: the resource is not in a state that allows this.",
    410: "Gone: the cached embedding or the video session was lost; send the image again or start a new session.",
    413: "Request body over the route's limit (SAM3_MAX_REQUEST_BYTES, SAM3_VIDEO_MAX_BYTES), or a video longer or "
    "with more frames than the server allows.",
    415: "Unsupported media type.",
    422: "Invalid request: a field is missing, of the wrong type or out of range (the message names it).",
    429: "Too many requests: the model is at capacity, or a queue or session cap is reached; retry later.",
    500: "Internal server error.",
    502: "A model replica failed while serving the request; retry.",
    503: "Service unavailable: the server is starting, or a model replica died while serving the request; retry.",
    504: "The model did not answer within SAM3_REQUEST_TIMEOUT_S.",
}


def error_responses(
    shape: type[BaseModel], *statuses: int, descriptions: dict[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: each status with `shape` (its provider's error body) and what it means."""
    said = descriptions or {}
    unknown = [s for s in statuses if s not in DESCRIPTIONS and s not in said]
    if unknown:
        raise ValueError(f"no description for status {unknown}: add one to DESCRIPTIONS or pass descriptions=")
    return {status: {"model": shape, "description": said.get(status, DESCRIPTIONS.get(status))}
            for status in sorted(set(statuses))}


def request_body(
    json_schema: dict[str, Any] | None = None, *binary_types: str, description: str | None = None
) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its body by hand: a JSON body's schema and/or raw binary uploads."""
    content: dict[str, Any] = {}
    if json_schema is not None:
        content["application/json"] = {"schema": json_schema}
    for media_type in binary_types:
        content[media_type] = {"schema": {"type": "string", "format": "binary"}}
    body: dict[str, Any] = {"required": True, "content": content}
    if description:
        body["description"] = description
    return {"requestBody": body}


class NotReady(BaseModel):
    """`GET /readyz` when a model replica does not answer."""

    status: Literal["not ready"] = Field(description="Always `not ready`.")
    reason: str = Field(description="Which replica did not answer, and why.")


class NativeErrorDetail(BaseModel):
    code: str = Field(description="A stable machine-readable code: bad_request, unauthorized, not_found, ...")
    message: str = Field(description="What went wrong, in words a person can act on.")
    details: Any = Field(None, description="Validation errors: [{field, message}, ...]; absent otherwise.")
    request_id: str | None = Field(
        None, description="The request's id, as in the `X-Request-ID` header of the answer and the server's log lines."
    )


class NativeError(BaseModel):
    """The native error body, for every path no provider claims: {"error": {"code", "message", "details"?,
    "request_id"?}}."""

    model_config = ConfigDict(title="NativeError")

    error: NativeErrorDetail
