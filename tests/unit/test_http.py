"""The HTTP plumbing renders any string a client can send: no 500 from an error message or an echo."""

from __future__ import annotations

import json

from fastapi import FastAPI
from fastapi.testclient import TestClient

from serve_app.core.errors import BadRequest
from serve_app.core.http import SafeJSONResponse, install_error_handlers


def _app() -> FastAPI:
    app = FastAPI(default_response_class=SafeJSONResponse)
    install_error_handlers(app)

    @app.post("/v1/echo")
    async def echo(body: dict) -> dict:
        if body.get("fail"):
            raise BadRequest(f"unknown model {body['model']}")
        return {"model": body["model"]}

    return app


def test_a_lone_surrogate_in_an_error_message_is_a_4xx_with_json():
    client = TestClient(_app())
    response = client.post("/v1/echo", content=b'{"model": "\\ud800", "fail": true}',
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.headers["content-type"] == "application/json"
    assert json.loads(response.content)["error"]["message"] == f"unknown model {chr(0xD800)}"


def test_a_lone_surrogate_echoed_in_a_success_is_valid_json():
    client = TestClient(_app())
    response = client.post("/v1/echo", content=b'{"model": "a\\udfffb"}', headers={"Content-Type": "application/json"})
    assert response.status_code == 200 and json.loads(response.content) == {"model": "a\udfffb"}
    assert client.post("/v1/echo", json={"model": "plain é"}).content.decode() == '{"model":"plain é"}'
