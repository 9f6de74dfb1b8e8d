"""A real Ray Serve instance for the integration tests: one cluster, one HTTP proxy, apps per configuration."""

from __future__ import annotations

import base64
import io
import socket

import numpy as np
import pytest
import requests
from PIL import Image

from serve_app.core.config import Config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


STATE: dict[str, str] = {}  # this session's state directory: apps never find state an earlier run left


@pytest.fixture(scope="session")
def serve_instance(tmp_path_factory):
    """Ray (2 CPUs, deployments ask for 0) and Serve's proxy on a free loopback port; yields the base URL."""
    import ray
    from ray import serve

    STATE["dir"] = str(tmp_path_factory.mktemp("state"))
    port = _free_port()
    from serve_app.core.stats import apply_allocator_env

    apply_allocator_env()  # as serve_app.main does
    from serve_app.core.failover import enable_proxy_failover

    enable_proxy_failover()  # as serve_app.main does: Serve's proxy loads the failover middleware
    import torch

    # Ray starts its workers with OMP_NUM_THREADS=1 (deployments ask for 0 CPUs), so replicas run torch on one thread.
    # References computed here must reduce in the same order: on CPUs whose kernels split a reduction across threads
    # (seen on AVX-512 machines), two threads move boxes by 1e-3 px and flip a mask pixel against one.
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def undeploy(name: str) -> None:
    """Free a module's own application (its replicas hold a model each) once the module is done."""
    from ray import serve

    serve.delete(name)


def deploy(name: str, config: Config, base_url: str) -> str:
    """Run `build_app(config)` as its own application under /<name>; returns its URL."""
    from ray import serve

    from deployments.app import build_app

    if not config.state_url and config.state_dir == Config().state_dir and STATE:
        config = config.model_copy(update={"state_dir": STATE["dir"]})
    serve.run(build_app(config), name=name, route_prefix=f"/{name}")
    return f"{base_url}/{name}"


@pytest.fixture(scope="session")
def app_url(serve_instance) -> str:
    """The default graph on tiny-random, with a batch window wide enough for concurrent requests to meet."""
    config = Config(encoder_max_batch_size=16, encoder_batch_wait_timeout_s=0.2, url_allowlist=[], web_ui=False)
    return deploy("main", config, serve_instance)


def png_b64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def random_image(seed: int, height: int = 96, width: int = 128) -> np.ndarray:
    """A test image: smooth shapes over noise, so different seeds give different embeddings."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    for _ in range(3):
        y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
        image[y0 : y0 + height // 3, x0 : x0 + width // 3] = rng.integers(80, 255, 3, dtype=np.uint8)
    return image


def segment(url: str, body: dict, timeout: float = 120) -> requests.Response:
    return requests.post(f"{url}/v1/image/segment", json=body, timeout=timeout)


API_KEY, OTHER_KEY = "test-key", "other-key"


@pytest.fixture(scope="session")
def image_server():
    """Real HTTP on 127.0.0.1: /img/<seed>.<png|jpg|webp|gif>?h=&w= (generated images), /redirect?to=<url>,
    /video/<frames>.mp4 (tests.videos.write_video(frames, 96, 128))."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlparse

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's API
            url = urlparse(self.path)
            query = parse_qs(url.query)
            if url.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", query["to"][0])
                self.end_headers()
                return
            if url.path.startswith("/video/") and url.path.endswith(".mp4") and url.path[7:-4].isdigit():
                from tests.videos import write_video  # /video/<frames>.mp4: the moving-shapes video, 96x128

                self._send(write_video(int(url.path[7:-4]), 96, 128), "video/mp4")
                return
            name = url.path.rsplit("/", 1)[-1]
            seed, _, ext = name.partition(".")
            if not url.path.startswith("/img/") or not seed.isdigit():
                self.send_error(404)
                return
            height, width = int(query.get("h", [96])[0]), int(query.get("w", [128])[0])
            fmt = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF"}.get(ext, "PNG")
            buffer = io.BytesIO()
            Image.fromarray(random_image(int(seed), height, width)).save(buffer, format=fmt)
            body = buffer.getvalue()
            self.send_response(200)
            self.send_header("Content-Type", f"image/{fmt.lower()}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _send(self, body: bytes, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="session")
def providers_url(serve_instance) -> str:
    """The graph with API keys on (API_KEY, OTHER_KEY), 127.0.0.1 allow-listed for image URLs, 3 ingress replicas."""
    config = Config(api_keys=[API_KEY, OTHER_KEY], url_allowlist=["127.0.0.1"], encoder_batch_wait_timeout_s=0.01,
                    jobs_sse_ping_s=1.0,  # /api/events keep-alives every second, so tests see them quickly
                    ingress_replicas=3)  # every provider test runs against several ingress replicas
    return deploy("providers", config, serve_instance)


def image_bytes(seed: int, fmt: str = "PNG", height: int = 96, width: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(random_image(seed, height, width)).save(buffer, format=fmt)
    return buffer.getvalue()


_ENGINE = None


def find_image_seed(texts: list[str], threshold: float = 0.5, height: int = 96, width: int = 128) -> int:
    """The first random_image seed on which tiny-random finds every phrase at `threshold` (same weights as served).

    Tests that need non-empty results use it, so they do not hang on one lucky seed of a random model.
    """
    global _ENGINE
    from serve_app.core.types import ConceptPrompt, SegmentParams
    from serve_app.image.engine import ImageEngine
    from serve_app.image.models import load_bundle

    if _ENGINE is None:
        _ENGINE = ImageEngine(load_bundle(Config()))
    params = SegmentParams(threshold=threshold)
    for seed in range(200):
        result = _ENGINE.segment(random_image(seed, height, width), [ConceptPrompt(t) for t in texts], params)
        if all(p.instances for p in result.prompts):
            return seed
    raise AssertionError(f"no seed in 0..199 gives instances for {texts} at {threshold}")
