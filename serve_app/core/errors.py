"""One error hierarchy for the whole service: each error knows its HTTP status, a stable code and a message."""

from __future__ import annotations


class Sam3Error(Exception):
    """Base class: raised anywhere, rendered once per provider into its own error shape."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, details: object | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.retry_after_s = retry_after_s  # the Retry-After header of a 429 or 503 (1 s when unset)

    def __reduce__(self):  # keep message/details/retry_after_s when pickled across Ray processes
        return (_rebuild, (type(self), self.message, self.details, self.retry_after_s))


def _rebuild(cls: type[Sam3Error], message: str, details: object | None, retry_after_s: int | None = None) -> Sam3Error:
    err = cls(message, details=details)
    err.retry_after_s = retry_after_s
    return err


class BadRequest(Sam3Error):
    status_code = 400
    code = "bad_request"


class InvalidImage(BadRequest):
    code = "invalid_image"


class InvalidPrompt(BadRequest):
    code = "invalid_prompt"


class Unauthorized(Sam3Error):
    status_code = 401
    code = "unauthorized"


class Forbidden(Sam3Error):
    status_code = 403
    code = "forbidden"


class NotFound(Sam3Error):
    status_code = 404
    code = "not_found"


class Gone(Sam3Error):
    status_code = 410
    code = "gone"


class PayloadTooLarge(Sam3Error):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(Sam3Error):
    status_code = 415
    code = "unsupported_media_type"


class ValidationFailed(Sam3Error):
    status_code = 422
    code = "validation_error"


class TooManyRequests(Sam3Error):
    status_code = 429
    code = "rate_limited"


class UpstreamError(Sam3Error):
    """A URL the client gave us could not be fetched."""

    status_code = 400
    code = "fetch_failed"


class ServiceUnavailable(Sam3Error):
    status_code = 503
    code = "unavailable"


class GatewayTimeout(Sam3Error):
    status_code = 504
    code = "timeout"


class ModelLoadError(RuntimeError):
    """Start-up failure: the configured model cannot be loaded. Not an HTTP error."""


class UrlNotAllowed(BadRequest):
    """A URL points at a private, loopback or otherwise internal address that is not allow-listed."""

    code = "url_not_allowed"


class InvalidVideo(BadRequest):
    """The bytes are not a readable video: not a container, no video stream, truncated or corrupt."""

    code = "invalid_video"
