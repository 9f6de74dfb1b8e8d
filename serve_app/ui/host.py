"""The one process that holds the Gradio app: built in a thread as the process starts, its queue kept running
under the app's own lifespan, each forwarded request run against it (serve_app/ui/bridge.py)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

from serve_app.image.service import SegmentService
from serve_app.ui.bridge import run_asgi

logger = logging.getLogger(__name__)


def build_host(service: SegmentService):
    """The Gradio app over `service`, mounted at the root of a FastAPI app of its own (slow: seconds of CPU)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a server does not phone home
    import gradio as gr
    from fastapi import FastAPI

    from serve_app.ui.blocks import build

    host = FastAPI()
    gr.mount_gradio_app(host, build(service), path="/", footer_links=["api", "gradio"])
    return host


class UIHost:
    """Builds the app once (call `start_soon` from the process' event loop); requests wait until it is up."""

    def __init__(self, service: SegmentService) -> None:
        self.service = service
        self._starting: asyncio.Task | None = None
        self._lifespan: asyncio.Task | None = None

    def start_soon(self) -> None:
        if self._starting is None or (self._starting.done() and self._starting.exception() is not None):
            self._starting = asyncio.get_running_loop().create_task(self._start())

    async def ready(self):
        self.start_soon()
        return await asyncio.shield(self._starting)

    async def handle(self, scope: dict, body: bytes) -> AsyncIterator[dict]:
        """One request (its path the public one, `root_path` where the UI is mounted), as ASGI send messages."""
        app = await self.ready()
        async for message in run_asgi(app, scope, body):
            yield message

    async def _start(self):
        host = await asyncio.to_thread(build_host, self.service)
        started = asyncio.Event()

        async def hold() -> None:
            async with host.router.lifespan_context(host):
                started.set()
                await asyncio.Event().wait()  # until the process' loop ends

        self._lifespan = asyncio.get_running_loop().create_task(hold())
        waiting = asyncio.ensure_future(started.wait())
        await asyncio.wait({waiting, self._lifespan}, return_when=asyncio.FIRST_COMPLETED)
        if not started.is_set():  # the lifespan failed: raise its error (the next request builds again)
            waiting.cancel()
            self._lifespan.result()
        logger.info("web UI ready")
        return host
