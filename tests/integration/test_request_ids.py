"""X-Request-ID on every front door and kind of answer, and the same id in Serve's log files of that request.

`providers_url` (text logs, API keys on, the web UI on, 3 ingress replicas) carries the sample of routes; a second
small app of this module's own runs with SAM3_LOG_FORMAT=json (SAM3_LOG_LEVEL=DEBUG, so the gate's refusals log a
line of ours) and shows that every line of its replicas' files is JSON with a request_id. The proxy's and
controller's encoding is global to the Serve instance (serve.start), so the session's proxy stays text here; that
serve_app.main passes it is covered in tests/unit/test_request_id_rules.py.
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import time
import uuid
from urllib.parse import urlparse

import pytest
import requests

from serve_app.core.config import Config
from tests.integration.conftest import API_KEY, deploy, png_b64, random_image, undeploy

RUN = uuid.uuid4().hex[:8]  # ids unique to this run: the session's log files hold every earlier test's lines
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
JSON_APP = "rids-json"
BEARER = {"Authorization": f"Bearer {API_KEY}"}


def rid(tag: str) -> str:
    return f"abc-{RUN}-{tag}"


def serve_log_dir() -> str:
    import ray

    return os.path.join(ray._private.worker.global_worker.node.get_logs_dir_path(), "serve")


def lines_with(needle: str, pattern: str, count: int = 1, timeout_s: float = 30.0) -> list[str]:
    """Lines holding `needle` in the Serve log files matching `pattern`, once at least `count` are there (Serve
    writes them through a buffer, and the files of other processes lag)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = []
        for path in glob.glob(os.path.join(serve_log_dir(), pattern)):
            with open(path, errors="replace") as handle:
                found += [line.rstrip("\n") for line in handle if needle in line]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.25)


def get(url: str, path: str, request_id: str | None = None, headers: dict | None = None, **kw) -> requests.Response:
    sent = {**(headers or {}), **({"X-Request-ID": request_id} if request_id is not None else {})}
    return requests.get(f"{url}{path}", headers=sent, timeout=120, **kw)


def post(url: str, path: str, request_id: str | bytes | None = None, headers: dict | None = None,
         **kw) -> requests.Response:
    sent = {**(headers or {}), **({"X-Request-ID": request_id} if request_id is not None else {})}
    return requests.post(f"{url}{path}", headers=sent, timeout=120, **kw)


IMAGE = png_b64(random_image(7, 48, 64))
SEGMENT = {"image": IMAGE, "prompts": [{"type": "concept", "text": "square"}]}


def sample(url: str) -> list[tuple[str, int, requests.Response, bool]]:
    """(tag, expected status, answer, whether its body is the native shape) for a sample of every front door."""
    key = {"x-api-key": API_KEY}
    return [
        ("native-200", 200, post(url, "/v1/image/segment", rid("native-200"), key, json=SEGMENT), False),
        ("healthz-200", 200, get(url, "/healthz", rid("healthz-200")), False),
        ("oxen-200", 200, get(url, "/api/ai/models", rid("oxen-200"), BEARER), False),
        ("ui-200", 200, get(url, "/ui/", rid("ui-200")), False),
        ("native-401", 401, post(url, "/v1/image/segment", rid("native-401"), json=SEGMENT), True),
        ("oxen-401", 401, post(url, "/api/ai/images/edit", rid("oxen-401"), json={}), False),
        ("segmind-401", 401, post(url, "/v1/sam3-image", rid("segmind-401"), json={}), False),
        ("roboflow-401", 401, post(url, "/sam3/concept_segment", rid("roboflow-401"), json={}), False),
        ("hf-401", 401, post(url, "/api/predict", rid("hf-401"), json={"data": []}), False),
        ("native-404", 404, get(url, "/v1/no-such-route", rid("native-404"), key), True),
        ("oxen-404", 404, get(url, "/api/media/no-such-file", rid("oxen-404")), False),
        ("native-422", 422, post(url, "/v1/image/segment", rid("native-422"), key, json={"prompts": []}), True),
        ("native-400", 400, post(url, "/v1/image/segment", rid("native-400"), {**key, "X-Request-Timeout": "soon"},
                                 json=SEGMENT), True),
        ("segmind-400", 400, post(url, "/v1/sam3-image", rid("segmind-400"),
                                  {**key, "Content-Type": "application/json"}, data=b"not json"), False),
        ("roboflow-422", 422, post(url, "/sam3/concept_segment", rid("roboflow-422"), BEARER, json={}), False),
        ("hf-422", 422, post(url, "/api/predict", rid("hf-422"), BEARER, json={"data": "x"}), False),
    ]


def test_every_front_door_and_answer_returns_the_clients_id(providers_url):
    for tag, status, response, native in sample(providers_url):
        assert response.status_code == status, (tag, response.status_code, response.text[:300])
        assert response.headers.get("x-request-id") == rid(tag), (tag, response.headers)
        if native:
            assert response.json()["error"]["request_id"] == rid(tag), (tag, response.text)
        elif status >= 400:
            assert "request_id" not in response.text, (tag, "no provider's error shape has the field")


def test_sse_answers_carry_the_id(providers_url):
    with requests.get(f"{providers_url}/api/events", headers={**BEARER, "X-Request-ID": rid("sse")}, stream=True,
                      timeout=30) as events:
        assert events.status_code == 200 and events.headers["x-request-id"] == rid("sse")
        assert events.headers["content-type"].startswith("text/event-stream")


def test_a_request_without_an_id_gets_one_that_serve_logs(providers_url):
    response = get(providers_url, "/healthz")
    made = response.headers["x-request-id"]
    assert UUID.fullmatch(made), made
    assert lines_with(made, "replica_providers_Ingress_*.log"), "the replica logs the id the client got"
    assert lines_with(made, "proxy_*.log"), "and so does the proxy"


@pytest.mark.parametrize("hostile", ["a" * 800, 'abc"quoted"', "abc<script>", "abc space", "abc;rm",
                                     "caf\u00e9".encode(), b"\xff\xfe"])
def test_a_hostile_id_is_replaced_never_echoed(providers_url, hostile):
    response = post(providers_url, "/v1/image/segment", hostile, {"x-api-key": API_KEY}, json={"prompts": []})
    returned = response.headers["x-request-id"]
    assert response.status_code == 422 and UUID.fullmatch(returned), (response.status_code, returned)
    assert response.json()["error"]["request_id"] == returned
    assert lines_with(returned, "replica_providers_Ingress_*.log"), "the replacement is what Serve logged"


def test_control_characters_in_the_header_never_reach_serve(providers_url):
    """A header value with CR, LF, NUL or DEL is not HTTP: the proxy's HTTP server (uvicorn, h11) refuses the
    request itself with a plain 400 before any middleware runs; the value is neither answered nor logged."""
    target = urlparse(providers_url)
    mark = f"injected{RUN}".encode()
    for value in (b"abc\r" + mark, b"abc\n" + mark, mark + b"\x00", mark + b"\x7f"):
        with socket.create_connection((target.hostname, target.port), timeout=10) as sock:
            sock.sendall(b"GET " + target.path.encode() + b"/healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: " + value
                         + b"\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400") and mark not in answer, (value, answer[:300])
    assert not lines_with(mark.decode(), "*.log", timeout_s=2)


def test_the_id_is_in_every_serve_log_line_of_its_request(providers_url):
    """A segmentation's id is in the proxy's access line and in the ingress, encoder and decoder replicas' lines
    (Serve hands it down every handle call), and never a hostile one."""
    fresh = {**SEGMENT, "image": png_b64(random_image(int(RUN, 16) % 10_000 + 1000, 48, 64))}  # not cached: encoded
    response = post(providers_url, "/v1/image/segment", rid("traced"), {"x-api-key": API_KEY}, json=fresh)
    assert response.status_code == 200 and response.headers["x-request-id"] == rid("traced")
    for pattern in ("proxy_*.log", "replica_providers_Ingress_*.log", "replica_providers_ImageEncoder_*.log",
                    "replica_providers_Decoder_*.log"):
        found = lines_with(rid("traced"), pattern)
        assert found, f"{rid('traced')} not in {pattern}"
        print(pattern, "->", found[0])
    ingress = lines_with(rid("traced"), "replica_providers_Ingress_*.log")
    assert any("POST /providers/v1/image/segment 200" in line for line in ingress), ingress  # its access line
    assert not lines_with("a" * 200, "*.log", timeout_s=1), "the 800-character id was never logged"


@pytest.fixture(scope="module")
def json_url(serve_instance):
    config = Config(log_format="json", log_level="DEBUG", api_keys=[API_KEY], max_request_bytes=4096, web_ui=False)
    url = deploy(JSON_APP, config, serve_instance)
    yield url
    undeploy(JSON_APP)


def test_json_logs_parse_and_carry_the_request_id(json_url):
    ok = get(json_url, "/healthz", rid("json-200"))
    denied = post(json_url, "/v1/image/segment", rid("json-401"), json={"prompts": []})
    too_large = post(json_url, "/v1/image/segment", rid("json-413"), {"x-api-key": API_KEY}, json=SEGMENT)
    assert (ok.status_code, denied.status_code, too_large.status_code) == (200, 401, 413)
    assert [r.headers["x-request-id"] for r in (ok, denied, too_large)] == [rid(t) for t in ("json-200", "json-401",
                                                                                             "json-413")]
    assert too_large.json()["error"]["request_id"] == rid("json-413")
    lines_with(rid("json-413"), f"replica_{JSON_APP}_Ingress_*.log", count=2)
    files = glob.glob(os.path.join(serve_log_dir(), f"replica_{JSON_APP}_*.log"))
    assert files
    parsed = []
    for path in files:
        with open(path) as handle:
            parsed += [json.loads(line) for line in handle if line.strip()]  # every line of every replica is JSON
    mine = [line for line in parsed if line.get("request_id", "").startswith(f"abc-{RUN}-json")]
    access = [line for line in mine if line.get("name") == "ray.serve" and line["request_id"] == rid("json-200")
              and line["message"].startswith(f"GET /{JSON_APP}/healthz 200")]
    assert access, mine
    ours = [line for line in mine if line.get("name") == "serve_app.core.http"]
    assert {line["request_id"] for line in ours} >= {rid("json-401"), rid("json-413")}, ours
    for line in access + ours:
        assert {"asctime", "levelname", "name", "message", "request_id", "deployment", "replica"} <= set(line), line
        assert line["deployment"] == f"{JSON_APP}_Ingress" and line["application"] == JSON_APP
    print(json.dumps(access[0]))
    print(json.dumps(ours[0]))
