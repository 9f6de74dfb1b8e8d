"""Request ids and logs without a Ray cluster: the id's validation, the proxy's middleware chain as Serve builds it
(Serve's own RequestIdMiddleware inside ours), the native error body's `request_id`, our loggers' lines in Serve's
log format (text and JSON) and the driver's JSON lines."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import pytest
from fastapi.testclient import TestClient

from serve_app.core.config import Config
from serve_app.core.errors import BadRequest
from serve_app.core.http import error_response
from serve_app.core.logs import (
    REQUEST_ID_MAX,
    JsonFormatter,
    RequestIds,
    configure_driver_logging,
    forward_to_serve_log,
    new_request_id,
    scope_request_id,
    serve_logging_config,
    valid_request_id,
)

@pytest.fixture(autouse=True)
def _our_loggers_as_they_were():
    """proxy_middlewares() points our loggers at Serve's log, as in the proxy: undo it after each test."""
    saved = {name: (lg.handlers[:], lg.level, lg.propagate)
             for name in ("serve_app", "deployments", "test_rid_pkg") for lg in [logging.getLogger(name)]}
    yield
    for name, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers, lg.level, lg.propagate = handlers, level, propagate


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


@pytest.mark.parametrize("value", ["abc", "abc-123", new_request_id(), "a" * REQUEST_ID_MAX, "Root=1-5e1b:x/y+z@q_.",
                                   b"abc-bytes"])
def test_a_valid_id_is_kept(value):
    assert valid_request_id(value) == (value.decode() if isinstance(value, bytes) else value)


@pytest.mark.parametrize("value", [None, "", "a" * (REQUEST_ID_MAX + 1), "a" * 800, "has space", "cr\rlf\n",
                                   "trailing\n", 'quo"te', "it's", "<b>", "caf\u00e9", "tab\t", "semi;colon",
                                   b"caf\xc3\xa9", b"\xff", b"nul\x00"])
def test_a_hostile_or_odd_id_is_refused(value):
    assert valid_request_id(value) is None


def test_new_ids_are_serve_shaped_and_distinct():
    ids = {new_request_id() for _ in range(100)}
    assert len(ids) == 100 and all(UUID.fullmatch(i) for i in ids)


# ---------------------------------------------------------------- the proxy's chain, as Serve 2.60 builds it


class Proxy:
    """Stands for Serve's proxy app behind the middlewares: records the ids it saw (the header, as Serve's
    `setup_request_context_and_handle` reads it: the last one) and answers as told."""

    def __init__(self, answer: str = "ok") -> None:
        self.answer, self.seen = answer, []

    async def __call__(self, scope, receive, send) -> None:
        ids = [v.decode() for k, v in scope["headers"] if k == b"x-request-id"]
        self.seen.append(ids)
        if self.answer == "die":  # the ingress replica died before answering: Serve's proxy sends nothing
            return
        if self.answer == "backpressure":  # Serve's own plain-text 503
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"text/plain"), (b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": b"queue full"})
            return
        headers = [(b"content-type", b"application/json")]
        if self.answer == "own-header":  # a replica that sets the header itself must not make it two
            headers.append((b"x-request-id", b"from-the-replica"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})


def chain(inner: Proxy):
    """Serve's own order (ray.serve._private.http_util._apply_middlewares): its RequestIdMiddleware first, then the
    callback's list, each wrapping the one before."""
    from ray.serve._private.http_util import _apply_middlewares

    from serve_app.core.failover import proxy_middlewares

    return _apply_middlewares(inner, proxy_middlewares())


def call(app, headers: list[tuple[bytes, bytes]], path: str = "/v1/image/segment", method: str = "POST",
         kind: str = "http") -> tuple[int | None, list, bytes]:
    scope = {"type": kind, "method": method, "path": path, "root_path": "", "headers": headers,
             "query_string": b""}
    sent: list = []
    messages = [{"type": "http.request", "body": b"{}", "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return (start or {}).get("status"), (start or {}).get("headers", []), body


def ids_of(headers) -> list[str]:
    return [v.decode("latin-1") for k, v in headers if k.lower() == b"x-request-id"]


def test_a_clients_id_passes_through_serve_and_comes_back_once():
    inner = Proxy()
    status, headers, _ = call(chain(inner), [(b"x-request-id", b"abc-42")])
    assert status == 200 and ids_of(headers) == ["abc-42"] and inner.seen == [["abc-42"]]


@pytest.mark.parametrize("sent", [[], [(b"x-request-id", b"a" * 800)], [(b"x-request-id", b'x"\r\n')],
                                  [(b"x-request-id", "caf\u00e9".encode())], [(b"x-request-id", b"\xff")],
                                  [(b"x-request-id", b"")]])
def test_a_missing_or_hostile_id_is_replaced_before_serve_sees_it(sent):
    inner = Proxy()
    status, headers, _ = call(chain(inner), sent)
    (returned,) = ids_of(headers)
    assert status == 200 and UUID.fullmatch(returned), returned
    assert inner.seen == [[returned]], "Serve logs and routes with the id the client gets back"


def test_two_ids_become_one():
    inner = Proxy()
    _, headers, _ = call(chain(inner), [(b"x-request-id", b"first"), (b"x-request-id", b"second")])
    assert ids_of(headers) == ["first"] and inner.seen == [["first"]]


def test_a_replicas_own_header_is_not_doubled():
    _, headers, _ = call(chain(Proxy("own-header")), [(b"x-request-id", b"abc-own")])
    assert ids_of(headers) == ["abc-own"]


@pytest.mark.parametrize("answer", ["die", "backpressure"])
def test_the_failover_middlewares_own_503s_carry_the_id_in_header_and_native_body(answer, monkeypatch):
    monkeypatch.setenv("SAM3_FAILOVER_RETRIES", "0")
    status, headers, body = call(chain(Proxy(answer)), [(b"x-request-id", b"abc-503")])
    assert status == 503 and ids_of(headers) == ["abc-503"]
    assert json.loads(body)["error"]["request_id"] == "abc-503"


def test_a_provider_503_has_the_header_but_no_field_its_shape_lacks(monkeypatch):
    monkeypatch.setenv("SAM3_FAILOVER_RETRIES", "0")
    status, headers, body = call(chain(Proxy("die")), [(b"x-request-id", b"abc-rf")], path="/sam3/concept_segment")
    assert status == 503 and ids_of(headers) == ["abc-rf"] and set(json.loads(body)) == {"message"}


def test_a_websocket_id_is_checked_too():
    inner = Proxy()
    call(chain(inner), [(b"x-request-id", b"a" * 800)], path="/v1/video/streams", kind="websocket")
    assert len(inner.seen) == 1 and UUID.fullmatch(inner.seen[0][0])


def test_request_ids_alone_adds_the_header_to_any_answer():
    _, headers, _ = call(RequestIds(Proxy("backpressure")), [])
    assert len(ids_of(headers)) == 1


# ---------------------------------------------------------------- error bodies


def test_only_the_native_shape_carries_request_id():
    exc = BadRequest("nope")
    native = json.loads(error_response("/v1/image/segment", exc, "abc-1").body)
    assert native == {"error": {"code": "bad_request", "message": "nope", "request_id": "abc-1"}}
    assert "request_id" not in json.loads(error_response("/v1/image/segment", exc).body)["error"]
    for path in ("/api/ai/images/edit", "/v1/sam3-image", "/sam3/concept_segment", "/api/predict"):
        assert "abc-1" not in error_response(path, exc, "abc-1").body.decode(), path


@pytest.fixture(scope="module")
def client() -> TestClient:
    from deployments.ingress import app

    return TestClient(app)


def test_the_ingress_puts_the_proxys_id_in_native_errors(client):
    """Without Serve's proxy in front the test client stands for it: the id is the request's x-request-id header."""
    missing = client.get("/v1/nothing-here", headers={"x-request-id": "abc-404"})
    assert missing.status_code == 404 and missing.json()["error"]["request_id"] == "abc-404"
    invalid = client.post("/v1/image/segment", content=b"not json",
                          headers={"x-request-id": "abc-json", "content-type": "application/json"})
    assert invalid.status_code == 400 and invalid.json()["error"]["request_id"] == "abc-json"
    starting = client.get("/v1/video/sessions/x", headers={"x-request-id": "abc-503"})  # no replica behind it here
    assert starting.status_code == 503 and starting.json()["error"]["request_id"] == "abc-503"
    bad_timeout = client.post("/v1/image/segment", json={}, headers={"x-request-id": "abc-400",
                                                                     "x-request-timeout": "soon"})
    assert bad_timeout.status_code == 400 and bad_timeout.json()["error"]["request_id"] == "abc-400"
    hostile = client.get("/v1/nothing-here", headers={"x-request-id": 'x"y'})
    assert "request_id" not in hostile.json()["error"], "never echoed raw"
    oxen = client.get("/api/ai/models/nothing", headers={"x-request-id": "abc-oxen"})
    assert oxen.status_code == 503 and oxen.json()["status"] == "error" and "abc-oxen" not in oxen.text


def test_the_schema_documents_request_id(client):
    detail = client.get("/openapi.json").json()["components"]["schemas"]["NativeErrorDetail"]["properties"]
    assert "request_id" in detail and detail["request_id"]["description"]


# ---------------------------------------------------------------- our loggers in Serve's log


@pytest.fixture()
def serve_log():
    """The `ray.serve` logger with one capturing handler in Serve's JSON format (as a replica's file handler)."""
    from ray._common.formatters import JSONFormatter

    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    handler = Capture()
    formatter = JSONFormatter()
    formatter.set_additional_log_standard_attrs(["name"])
    handler.setFormatter(formatter)
    serve_logger = logging.getLogger("ray.serve")
    saved = serve_logger.handlers[:]
    serve_logger.handlers = [handler]
    yield lines
    serve_logger.handlers = saved


def test_our_lines_reach_serves_log_with_the_request_id(serve_log):
    current = {"id": "abc-log"}
    forward_to_serve_log("DEBUG", lambda: current["id"], loggers=("test_rid_pkg",))
    log = logging.getLogger("test_rid_pkg.module")
    log.debug("in a request")
    current["id"] = ""
    log.info("outside any request")
    log.info("explicit", extra={"request_id": "abc-extra"})
    forward_to_serve_log("WARNING", lambda: "x", loggers=("test_rid_pkg",))  # again: replaces, never doubles
    log.info("below the new level")
    log.warning("once")
    lines = [json.loads(line) for line in serve_log]
    assert [line["message"] for line in lines] == ["in a request", "outside any request", "explicit", "once"]
    assert lines[0]["request_id"] == "abc-log" and lines[0]["name"] == "test_rid_pkg.module"
    assert lines[0]["levelname"] == "DEBUG" and "asctime" in lines[0]
    assert "request_id" not in lines[1] and lines[2]["request_id"] == "abc-extra"
    assert not logging.getLogger("test_rid_pkg").propagate


def test_our_lines_in_serves_text_format_carry_the_id():
    from ray.serve._private.logging_utils import ServeFormatter

    formatter = ServeFormatter("sam3_Ingress", "abcd1234")
    formatter.set_additional_log_standard_attrs(["name"])
    record = logging.LogRecord("serve_app.core.http", logging.WARNING, __file__, 1, "429 %s", ("/v1/x",), None)
    record.request_id = "abc-text"
    line = formatter.format(record)
    assert "abc-text" in line and "serve_app.core.http" in line and line.endswith("429 /v1/x"), line


# ---------------------------------------------------------------- formats and knobs


def test_the_drivers_json_lines():
    record = logging.LogRecord("sam3_serve", logging.INFO, __file__, 7, "ready on %s", ("http://x",), None)
    record.request_id, record._ray_timestamp_ns = "abc-drv", 123
    line = json.loads(JsonFormatter().format(record))
    assert line["timestamp_ns"] == 123 and "_ray_timestamp_ns" not in line
    assert {"asctime", "levelname", "name", "message", "filename", "lineno", "process", "timestamp_ns"} <= set(line)
    assert line["message"] == "ready on http://x" and line["name"] == "sam3_serve" and line["request_id"] == "abc-drv"
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(JsonFormatter().format(failed))["exc_text"]


def test_configure_driver_logging_switches_the_root_handlers(capsys):
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers = [logging.StreamHandler()]
    try:
        configure_driver_logging("json", "WARNING")
        logging.getLogger("sam3_serve").warning("json line")
        logging.getLogger("sam3_serve").info("dropped")
        out = capsys.readouterr().err.strip().splitlines()
        assert len(out) == 1 and json.loads(out[0])["message"] == "json line"
    finally:
        root.handlers, root.level = saved, level


def test_serve_logging_config_is_a_valid_serve_logging_config():
    from ray.serve.schema import LoggingConfig

    json_config = LoggingConfig(**serve_logging_config("json", "DEBUG", enable_access_log=False, encoding="TEXT"))
    assert json_config.encoding == "JSON" and json_config.log_level == "DEBUG" and not json_config.enable_access_log
    assert json_config.additional_log_standard_attrs == ["name"]
    assert LoggingConfig(**serve_logging_config()).encoding == "TEXT"


def test_every_deployment_gets_the_knobs_and_keeps_its_own_access_log_setting():
    from deployments.app import build_app

    found, stack = {}, [build_app(Config(log_format="json", log_level="WARNING"))._bound_deployment]
    while stack:
        node = stack.pop()
        found[node.name] = node.logging_config
        stack.extend(a._bound_deployment for a in node.init_args if hasattr(a, "_bound_deployment"))
    assert {"Ingress", "ImageEncoder", "Decoder", "ImageCache", "VideoSessions", "VideoStreams", "JobStore",
            "JobRunner", "WebUI"} <= set(found)
    assert all(c["encoding"] == "JSON" and c["log_level"] == "WARNING" for c in found.values()), found
    assert found["ImageCache"]["enable_access_log"] is False and found["Ingress"].get("enable_access_log", True)


def test_the_log_knobs_accept_any_case():
    config = Config.from_env({"SAM3_LOG_FORMAT": "JSON", "SAM3_LOG_LEVEL": "debug"})
    assert (config.log_format, config.log_level) == ("json", "DEBUG") and Config().log_format == "text"
    with pytest.raises(ValueError, match="SAM3_LOG_FORMAT"):
        Config.from_env({"SAM3_LOG_FORMAT": "xml"})


def test_scope_request_id_reads_only_a_valid_header():
    assert scope_request_id({"headers": [(b"x-request-id", b"abc")]}) == "abc"
    assert scope_request_id({"headers": [(b"x-request-id", b"a b")]}) is None
    assert scope_request_id({"headers": []}) is None
