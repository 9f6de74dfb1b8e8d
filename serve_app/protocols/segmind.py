"""segmind-compatible routes: parse its requests into the internal request, render results and errors in its shapes."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["segmind"])
