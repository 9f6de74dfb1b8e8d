"""API keys: configured once, checked in constant time; a key maps to an opaque tenant id."""

from __future__ import annotations

import hashlib
import hmac

from serve_app.core.errors import Unauthorized

ANONYMOUS = "anonymous"


class Authenticator:
    """No keys configured = auth off (every caller is the anonymous tenant; main binds loopback only)."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def tenant(self, key: str | None, how: str = "an API key") -> str:
        """The caller's tenant id; raises Unauthorized (401) for a missing or unknown key."""
        if not self.enabled:
            return ANONYMOUS
        if not key:
            raise Unauthorized(f"missing API key: send {how}")
        given = key.encode()
        if not any(hmac.compare_digest(given, known) for known in self._keys):
            raise Unauthorized("invalid API key")
        return hashlib.sha256(given).hexdigest()[:16]


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
