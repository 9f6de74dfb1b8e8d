"""One object per ingress replica, set when the replica starts and read by routes as a FastAPI dependency."""

from __future__ import annotations

from typing import Generic, TypeVar

from serve_app.core.errors import ServiceUnavailable

T = TypeVar("T")


class Slot(Generic[T]):
    """`set` at start-up; `get` is the dependency, a 503 with `unavailable` while nothing is set."""

    def __init__(self, unavailable: str) -> None:
        self.unavailable = unavailable
        self.value: T | None = None

    def set(self, value: T | None) -> None:
        self.value = value

    def get(self) -> T:
        if self.value is None:
            raise ServiceUnavailable(self.unavailable)
        return self.value
