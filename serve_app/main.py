"""`make serve`: start Ray, start Serve's HTTP proxy on SAM3_HOST:SAM3_PORT, run the graph, wait."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from serve_app.core.config import Config
from serve_app.core.errors import ModelLoadError
from serve_app.core.failover import enable_proxy_failover
from serve_app.core.logs import configure_driver_logging, serve_logging_config
from serve_app.core.stats import apply_allocator_env

logger = logging.getLogger("sam3_serve")


LOOPBACK = ("127.0.0.1", "localhost", "::1")
APP_NAME = "sam3"


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
    """`python -m serve_app.main`: the service configured from SAM3_* environment variables only."""
    try:
        config = Config.from_env()
    except ValueError as exc:
        print(f"sam3-serve: cannot start: {exc}", file=sys.stderr)
        return 2
    return serve(config)


def serve(config: Config) -> int:
    """Start Ray, Serve's HTTP proxy on config.host:config.port and the graph; return once stopped (Ctrl-C, SIGTERM).
    `sam3-serve` (serve_app/cli.py) calls it with the configuration its flags, file and environment give."""
    configure_driver_logging(config.log_format, config.log_level)  # SAM3_LOG_FORMAT, SAM3_LOG_LEVEL
    try:
        # before Ray starts: a bad SAM3_MODEL is one clear line. From models, not sources: the driver imports torch
        # before ray.init. Without it test_service_restart twice saw SIGTERM reach Ray's C++ handler, which aborted
        # the driver (exit -6, requests in flight cut), on a loaded machine; the cause is not pinned down.
        from serve_app.image.models import probe_model

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
    enable_proxy_failover(config)  # Serve's proxy resends a request whose ingress replica died (core/failover.py)
    stop = StopSignal()
    for signum in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C and an orchestrator's stop: the same clean stop
        signal.signal(signum, stop)
    group = os.getpgrp()
    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    rejoin_process_group(group)
    configure_driver_logging(config.log_format, config.log_level, also=("ray", "ray.serve"))  # Ray's lines here too
    serve.start(http_options={"host": config.host, "port": config.port, "request_timeout_s": config.request_timeout_s},
                logging_config=serve_logging_config(config.log_format, config.log_level))  # the proxy, the controller
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    logger.info("sam3-serve ready on http://%s:%d (model %s); API docs at /docs", config.host, config.port, config.model)
    stop.wait()
    shut_down(config.shutdown_grace_s + SHUTDOWN_MARGIN_S)
    logging.shutdown()
    os._exit(0)  # Ray has stopped: the interpreter's own exit could still wait on a thread of Ray's client


class StopSignal:
    """The SIGINT / SIGTERM handler: the first signal starts the clean stop; later ones (Ctrl-C pressed again, an
    orchestrator's SIGTERM after a Ctrl-C) change nothing. Python runs a handler in the main thread between two
    bytecodes, also inside the previous handler's `Event.set`, which holds the event's (non-reentrant) lock: a
    second `set` there would wait for that lock forever and the service would never stop. So only the first signal
    touches the event."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.received = 0

    def __call__(self, signum: int, frame: object) -> None:
        self.received += 1
        if self.received == 1:
            self.event.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.event.wait(timeout)


SHUTDOWN_MARGIN_S = 2.0  # past the replicas' grace: Serve deleting the application, then Ray stopping its processes


def rejoin_process_group(group: int) -> None:
    """ray.init makes this process the leader of a new process group (for its reaper), which takes it out of the
    terminal's foreground group: Ctrl-C on `make serve` would reach make but never this process, and make would wait
    for it forever. Back in the original group, Ctrl-C reaches it (Ray's own processes block SIGINT)."""
    if os.getpgrp() != group:
        try:
            os.setpgid(0, group)
        except OSError as exc:  # the group is gone (its leader exited): Ctrl-C could not reach us anyway
            logger.debug("could not rejoin process group %d: %s", group, exc)


def shut_down(budget_s: float) -> None:
    """Stop within `budget_s`: Serve deletes the application (each replica finishes what it serves within
    SAM3_SHUTDOWN_GRACE_S; the JobRunner hands its running jobs back to the queue; sessions close); whatever is
    still running then is stopped with Ray (every process this service started)."""
    import ray
    from ray import serve

    started = time.monotonic()
    logger.info("stopping: finishing the requests in flight (up to %.0f s)", budget_s)

    def stop_serve() -> None:
        # the application first, while Serve's proxy still runs: its replicas finish what they serve and the
        # answers reach their clients; then the proxy and the controller
        serve.delete(APP_NAME)
        serve.shutdown()

    done = threading.Thread(target=stop_serve, name="serve-shutdown", daemon=True)
    done.start()
    done.join(budget_s)
    if done.is_alive():
        logger.warning("Serve did not stop within %.0f s; stopping Ray's processes", budget_s)
    ray.shutdown()
    logger.info("stopped in %.1f s", time.monotonic() - started)

if __name__ == "__main__":
    sys.exit(main())
