"""Failover without Ray: which routes are re-sent when their replica dies, and the proxy middleware that does it.

The middleware's contract is ASGI: here the app behind it is a small ASGI app that fails (returns without an
answer, as Serve's proxy does when the ingress replica serving a request dies) a set number of times.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from serve_app.core.errors import BadRequest
from serve_app.core.failover import KEYED, ONCE, RETRY, ROUTES, ProxyFailover, idempotency_key, route_policy


def test_every_route_of_the_api_has_a_failover_policy():
    from deployments.ingress import app

    for path, operations in app.openapi()["paths"].items():
        for method in operations:
            method = method.upper()
            named = [r for r in ROUTES if method in r.methods and r.template in (path, "*")]
            assert named, f"{method} {path} has no entry in serve_app/core/failover.ROUTES"


@pytest.mark.parametrize("method,path,policy,route", [
    ("POST", "/v1/image/segment", RETRY, "/v1/image/segment"),
    ("POST", "/tests-app/v1/image/segment", RETRY, "/v1/image/segment"),  # an application's route prefix
    ("POST", "/sam3/embed_image", RETRY, "/sam3/embed_image"),
    ("POST", "/api/ai/queue", KEYED, "/api/ai/queue"),
    ("POST", "/v2/sam3-image", KEYED, "/v2/sam3-image"),
    ("POST", "/v1/video/sessions/abc/prompts", ONCE, "/v1/video/sessions/abc/prompts"),
    ("POST", "/v1/video/sessions", ONCE, "/v1/video/sessions"),
    ("GET", "/v1/video/sessions/abc", RETRY, "/v1/video/sessions/abc"),
    ("DELETE", "/v1/video/sessions/abc", ONCE, "/v1/video/sessions/abc"),
    ("POST", "/something/else", ONCE, "/something/else"),
    ("POST", "/v1/image/segment/extra", ONCE, "/v1/image/segment/extra"),
])
def test_route_policy(method, path, policy, route):
    assert route_policy(method, path) == (policy, route)


@pytest.mark.parametrize("value", ["", "a" * 256, "has space", "tab\there", "é"])
def test_a_bad_idempotency_key_is_400(value):
    with pytest.raises(BadRequest):
        idempotency_key(value)
    assert idempotency_key("retry-1:abc") == "retry-1:abc" and idempotency_key(None) is None


class Flaky:
    """An ASGI app that returns without an answer `fails` times, then echoes the body and X-Request-Timeout."""

    def __init__(self, fails: int) -> None:
        self.fails, self.calls, self.bodies = fails, 0, []

    async def __call__(self, scope, receive, send) -> None:
        self.calls += 1
        message = await receive()
        self.bodies.append(message.get("body", b""))
        if self.calls <= self.fails:
            return  # as Serve's proxy does when the replica serving the request died: no http.response.start
        headers = dict(scope["headers"])
        body = json.dumps({"body": message["body"].decode(), "timeout": headers.get(b"x-request-timeout", b"").decode(),
                           "hint": headers.get(b"x-request-disconnect-disabled", b"").decode()}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def call(app, method: str, path: str, body: bytes = b'{"image": "x"}', headers=(), chunks: int = 1) -> tuple[int, dict, dict]:
    async def run():
        sent = []
        parts = [body[i::chunks] for i in range(chunks)] if chunks > 1 else [body]
        messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]

        async def receive():
            if messages:
                return messages.pop(0)
            await asyncio.sleep(3600)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": method, "path": path, "root_path": "",
                 "headers": [(k.encode(), v.encode()) for k, v in headers]}
        await app(scope, receive, send)
        return sent

    sent = asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start.get("headers", [])}, json.loads(payload)


def test_an_idempotent_request_whose_replica_died_is_sent_again_with_its_body_and_what_is_left_of_its_deadline():
    inner = Flaky(fails=2)
    status, _, answer = call(ProxyFailover(inner, retries=3, timeout_s=30), "POST", "/app/v1/image/segment",
                             headers=[("x-request-timeout", "20")])
    assert status == 200 and inner.calls == 3 and inner.bodies == [b'{"image": "x"}'] * 3
    assert answer["body"] == '{"image": "x"}' and 19 < float(answer["timeout"]) < 20


def test_a_request_past_its_retries_is_a_503_in_its_front_doors_shape_never_a_bare_500():
    status, headers, answer = call(ProxyFailover(Flaky(fails=10), retries=1, timeout_s=30), "POST",
                                   "/sam3/concept_segment")
    assert status == 503 and headers["retry-after"] == "1" and set(answer) == {"message"}  # Roboflow's shape
    status, _, answer = call(ProxyFailover(Flaky(fails=10), retries=1, timeout_s=30), "POST", "/api/ai/images/edit")
    assert status == 503 and answer["status"] == "error" and answer["status_message"] == "unavailable"


def test_a_state_changing_request_is_never_sent_twice():
    inner = Flaky(fails=1)
    status, _, answer = call(ProxyFailover(inner, retries=3, timeout_s=30), "POST", "/v1/video/sessions/s/prompts")
    assert status == 503 and inner.calls == 1 and answer["error"]["code"] == "unavailable"
    inner = Flaky(fails=1)  # a queue submission without a key: once; with one: again (the store answers the repeat)
    assert call(ProxyFailover(inner, retries=3, timeout_s=30), "POST", "/api/ai/queue")[0] == 503 and inner.calls == 1
    inner = Flaky(fails=1)
    status, _, _ = call(ProxyFailover(inner, retries=3, timeout_s=30), "POST", "/api/ai/queue",
                        headers=[("idempotency-key", "k1")])
    assert status == 200 and inner.calls == 2


def test_a_chunked_body_is_kept_whole_and_a_body_over_the_replay_limit_runs_once():
    inner = Flaky(fails=1)
    status, _, answer = call(ProxyFailover(inner, retries=2, timeout_s=30), "POST", "/v1/image/segment",
                             body=b"0123456789" * 10, chunks=4)
    assert status == 200 and inner.calls == 2 and len(answer["body"]) == 100
    inner = Flaky(fails=1)
    status, _, _ = call(ProxyFailover(inner, retries=2, timeout_s=30, replay_max_bytes=50), "POST",
                        "/v1/image/segment", body=b"x" * 100)
    assert status == 503 and inner.calls == 1


def test_no_retry_past_the_deadline_and_none_when_retries_are_off():
    inner = Flaky(fails=5)
    assert call(ProxyFailover(inner, retries=5, timeout_s=0.3), "POST", "/v1/image/segment")[0] == 503
    assert inner.calls <= 3, "backoff 0.1 + 0.25 s: the deadline leaves room for two retries at most"
    inner = Flaky(fails=1)
    assert call(ProxyFailover(inner, retries=0, timeout_s=30), "POST", "/v1/image/segment")[0] == 503
    assert inner.calls == 1


def test_serves_hint_headers_from_a_client_are_dropped():
    """Serve's proxy would turn its timeout off, or keep work running after its client left, on these headers."""
    status, _, answer = call(ProxyFailover(Flaky(fails=0), retries=0, timeout_s=30), "POST", "/v1/image/segment",
                             headers=[("x-request-disconnect-disabled", "1")])
    assert status == 200 and answer["hint"] == ""


def test_serves_own_plain_text_503_becomes_the_routes_json_with_its_retry_after():
    async def backpressure(scope, receive, send):
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"2")]})
        await send({"type": "http.response.body", "body": b"Request dropped due to backpressure"})

    status, headers, answer = call(ProxyFailover(backpressure, retries=3, timeout_s=30), "POST", "/v1/sam3-image")
    assert status == 503 and headers["retry-after"] == "2"
    assert answer["code"] == "overloaded" and "queue is full" in answer["error"]  # Segmind's shape


def test_streams_are_exempt_from_serves_proxy_timeout_and_other_requests_keep_it():
    seen = {}

    async def app(scope, receive, send):
        seen[scope["path"]] = dict(scope["headers"]).get(b"x-request-timeout-seconds")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    middleware = ProxyFailover(app, retries=0, timeout_s=30)
    for method, path in (("GET", "/api/events"), ("POST", "/v1/video/sessions/s1/propagate"),
                         ("POST", "/v1/image/segment")):
        call(middleware, method, path, headers=[("x-request-timeout-seconds", "5")])
    assert seen == {"/api/events": b"0", "/v1/video/sessions/s1/propagate": b"0", "/v1/image/segment": None}


def test_the_architecture_page_lists_every_route_as_routes_says():
    """docs/architecture.md's table is the one users read: each of ROUTES is a row with its own policy."""
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    labels = {RETRY: "| re-sent |", KEYED: "| re-sent with an `Idempotency-Key`", ONCE: "| never re-sent: 503 |"}
    for route in ROUTES:
        name = "every other `GET` / `HEAD`" if route.template == "*" else f"`{' '.join(route.methods)} {route.template}`"
        row = next((line for line in page.splitlines() if line.startswith(f"| {name} |")), None)
        assert row is not None, f"docs/architecture.md has no row for {name}"
        assert labels[route.policy] in row, f"docs/architecture.md says otherwise for {name}: {row}"


# ------------------------------------------------------------------ in the graph: deployments/handles.Failover


def dying(times: int, error=None):
    """A handle call that fails as a call to a dead replica does `times` times, then answers."""
    from ray.exceptions import ActorDiedError

    calls = {"n": 0}

    async def make():
        calls["n"] += 1
        if calls["n"] <= times:
            raise error if error is not None else ActorDiedError()
        return "answer"

    return make, calls


def test_a_model_call_whose_replica_died_is_sent_again_and_counted():
    from deployments.handles import Failover

    failover = Failover(3)
    make, calls = dying(2)
    assert asyncio.run(failover.call(make, 30.0)) == "answer" and calls["n"] == 3
    assert failover.counts == {"retried": 2, "recovered": 1, "gave_up": 0}


def test_past_its_retries_or_its_deadline_a_call_is_a_503_and_with_retries_off_it_is_sent_once():
    from deployments.handles import Failover, ReplicaDied

    failover = Failover(2)
    make, calls = dying(10)
    with pytest.raises(ReplicaDied) as refused:
        asyncio.run(failover.call(make, 30.0))
    assert refused.value.status_code == 503 and calls["n"] == 3 and failover.counts["gave_up"] == 1
    make, calls = dying(10)
    with pytest.raises(ReplicaDied):
        asyncio.run(Failover(20).call(make, 30.0, deadline=__import__("time").time() + 0.4))
    assert calls["n"] <= 3, "backoff 0.05 + 0.25 s: a 0.4 s deadline leaves room for two retries at most"
    make, calls = dying(1)
    with pytest.raises(ReplicaDied):
        asyncio.run(Failover(0).call(make, 30.0))
    assert calls["n"] == 1


def test_a_replica_down_the_path_that_gave_up_is_not_retried_again_here():
    """The ImageCache's own retries of a dead encoder ran out: its answer (a RayTaskError of ReplicaDied) is a plain
    503 for the ingress, which must not re-send the cache call another 3 times."""
    from ray.exceptions import RayTaskError

    from deployments.handles import Failover, ReplicaDied

    remote = RayTaskError("encode", "traceback", ReplicaDied("a model replica died"))
    make, calls = dying(10, error=remote.as_instanceof_cause())
    with pytest.raises(Exception) as failed:
        asyncio.run(Failover(3).call(make, 30.0))
    assert failed.value.status_code == 503 and not isinstance(failed.value, ReplicaDied) and calls["n"] == 1
