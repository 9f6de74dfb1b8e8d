"""`make serve`: start Ray, start Serve's HTTP proxy on SAM3_HOST:SAM3_PORT, run the graph, wait."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

from serve_app.core.config import Config
from serve_app.core.errors import ModelLoadError
from serve_app.core.stats import apply_allocator_env

logger = logging.getLogger("sam3_serve")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def bind_host(config: Config) -> str:
    """With no API keys, never listen beyond loopback: an open model server is someone else's GPU."""
    if config.api_keys:
        return config.host
    logger.warning("auth is off (no SAM3_API_KEYS): binding to 127.0.0.1 only")
    if config.host not in LOOPBACK:
        logger.warning("SAM3_HOST=%s ignored: set SAM3_API_KEYS to listen on other interfaces", config.host)
        return "127.0.0.1"
    return config.host


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = Config.from_env()
        from serve_app.image.models import probe_model  # before Ray starts: a bad SAM3_MODEL is one clear line

        probe_model(config.model)
    except (ValueError, ModelLoadError) as exc:
        print(f"sam3-serve: cannot start: {exc}", file=sys.stderr)
        return 2

    state_dir = str(Path(config.state_dir).expanduser().absolute())  # every process on this box, one file
    config = config.model_copy(update={"host": bind_host(config), "state_dir": state_dir})

    import ray
    from ray import serve

    from deployments.app import build_app

    apply_allocator_env()  # before Ray starts: every Ray process inherits it
    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": config.host, "port": config.port, "request_timeout_s": config.request_timeout_s})
    serve.run(build_app(config), name="sam3", route_prefix="/")
    logger.info("sam3-serve ready on http://%s:%d (model %s); API docs at /docs", config.host, config.port, config.model)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
