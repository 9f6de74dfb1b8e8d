"""The OpenAPI schema tells the truth: each route's error statuses in the body its provider really renders, keys
where the gate asks for one, 413 wherever a body is read, every request body (raw uploads too), and 405's `Allow`.

Built from the app itself (`app.openapi()`), without Ray: the documented error schemas are checked against what
`error_response` renders for the same path, so a route documenting another provider's shape fails here.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from fastapi.testclient import TestClient

from serve_app.core.errors import Sam3Error
from serve_app.core.http import admitted_path, error_response, key_rule
from serve_app.core.openapi import error_responses

# (path, status) documented with a body that is not the provider's error shape, and the component it is
NOT_ERROR_SHAPED = {
    ("/v2/requests/{request_id}/status", "422"): "StatusOut",  # a FAILED request, as Segmind's gateway answers it
    ("/v2/requests/{request_id}", "422"): "ResultOut",
    ("/readyz", "503"): "NotReady",
}
BODILESS_POSTS = {"/v1/video/sessions/{session_id}/reset"}  # POSTs that read no body
RAW_UPLOADS = {"/v1/video/sessions": {"video/*", "application/octet-stream"}}  # routes that take the file itself


@pytest.fixture(scope="module")
def spec() -> dict:
    import ray

    from deployments.ingress import app

    started_before = ray.is_initialized()  # the whole suite runs integration tests (and Ray) first
    schema = app.openapi()
    if not started_before:
        assert not ray.is_initialized(), "building the schema must not start Ray"
    return schema


@pytest.fixture(scope="module")
def client() -> TestClient:
    from deployments.ingress import app

    return TestClient(app)


def operations(spec: dict) -> list[tuple[str, str, dict]]:
    return [(path, method.upper(), op) for path, item in spec["paths"].items() for method, op in item.items()]


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def rendered(path: str, status: int) -> dict:
    """The body the service renders for an error of this status on this path (validation errors with details)."""
    details = [{"field": "image", "message": "Field required"}] if status == 422 else None
    exc = Sam3Error("what went wrong", details=details)
    exc.status_code, exc.code = status, "some_code"
    return json.loads(error_response(concrete(path), exc).body)


def json_schema(spec: dict, response: dict) -> dict:
    schema = response["content"]["application/json"]["schema"]
    return {**schema, "components": spec["components"]}  # `#/components/...` refs resolve against this root


def test_the_app_has_every_provider_route(spec):
    paths = set(spec["paths"])
    for path in ("/v1/image/segment", "/api/ai/images/edit", "/api/ai/queue", "/v1/sam3-image", "/v2/{slug}",
                 "/sam3/concept_segment", "/api/predict", "/v1/video/sessions", "/v1/stats"):
        assert path in paths
    assert not any(path.startswith("/ui") for path in paths), "the web UI is mounted, not part of the schema"


def test_keyed_routes_document_401_and_only_they_do(spec):
    for path, method, op in operations(spec):
        keyed = key_rule(concrete(path)) is not None
        assert ("401" in op["responses"]) == keyed, f"{method} {path}: keyed={keyed}, {sorted(op['responses'])}"


def test_every_route_that_reads_a_body_documents_it_and_413(spec):
    for path, method, op in operations(spec):
        if method == "POST" and path not in BODILESS_POSTS:
            assert op.get("requestBody", {}).get("content"), f"{method} {path} documents no request body"
        if method == "POST":
            assert "413" in op["responses"], f"{method} {path} does not document the body limit's 413"


def test_admitted_routes_document_their_refusals(spec):
    """Every image model route behind admission lists 503 (overloaded, deadline) and 429 (the key's own limit)."""
    gated = [(path, method) for path, method, _ in operations(spec) if method == "POST" and admitted_path(concrete(path))]
    assert len(gated) >= 7, gated  # native, Oxen, Segmind, two Roboflow, two HF Space
    for path, method in gated:
        responses = spec["paths"][path][method.lower()]["responses"]
        assert {"429", "503", "504"} <= set(responses), (path, sorted(responses))


def test_raw_uploads_document_their_binary_content_types(spec):
    for path, media_types in RAW_UPLOADS.items():
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert "application/json" in content and media_types <= set(content), sorted(content)
        for media_type in media_types:
            assert content[media_type]["schema"] == {"type": "string", "format": "binary"}


def test_no_route_documents_fastapis_validation_error_shape(spec):
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert "HTTPValidationError" not in json.dumps(spec["paths"])
    validated = [(path, method) for path, method, op in operations(spec) if "422" in op["responses"]]
    assert len(validated) > 20  # the body routes and every route with parameters


def test_every_documented_error_is_the_body_its_provider_renders(spec):
    """422 with details included: the shape of each documented error validates what the route's path renders."""
    checked = 0
    for path, method, op in operations(spec):
        for status, response in op["responses"].items():
            if int(status) < 400:
                continue
            schema = json_schema(spec, response)
            special = NOT_ERROR_SHAPED.get((path, status))
            if special is not None:
                assert schema["$ref"].endswith(f"/{special}"), f"{method} {path} {status}: {schema}"
                continue
            body = rendered(path, int(status))
            errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(body)]
            assert not errors, f"{method} {path} {status}: {body} is not the documented {schema['$ref']}: {errors}"
            checked += 1
    assert checked > 100


def test_each_provider_documents_its_own_shape_not_anothers(spec):
    expected = {"/v1/image/segment": "NativeError", "/api/ai/images/edit": "OxenError", "/v1/sam3-image":
                "SegmindErrorOut", "/v2/{slug}": "SegmindErrorOut", "/sam3/embed_image": "RoboflowError",
                "/api/sam2_compatible": "SpaceError", "/v1/video/sessions": "NativeError"}
    for path, model in expected.items():
        ref = spec["paths"][path]["post"]["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith(f"/{model}"), (path, ref)


def test_error_responses_needs_a_description_for_every_status():
    from serve_app.core.openapi import NativeError

    assert set(error_responses(NativeError, 422, 400, 400)) == {400, 422}
    assert error_responses(NativeError, 418, descriptions={418: "teapot"})[418]["description"] == "teapot"
    with pytest.raises(ValueError, match="418"):
        error_responses(NativeError, 418)


@pytest.mark.parametrize(("method", "path", "allow", "shape"), [
    ("PUT", "/v1/video/sessions/abc", "GET, DELETE", "error"),
    ("PATCH", "/api/ai/queue/abc", "GET, DELETE", "status_description"),
    ("GET", "/v1/image/segment", "POST", "error"),
    ("DELETE", "/api/ai/queue", "GET, POST", "status_description"),
])
def test_405_names_every_allowed_method_in_allow(client, method, path, allow, shape):
    response = client.request(method, path)
    assert response.status_code == 405, response.text
    assert response.headers["allow"] == allow
    assert response.headers["content-type"] == "application/json" and shape in response.json()


def test_schemathesis_reads_every_operation(spec):
    """The fuzz test's loader (tests/integration/test_schema_fuzz.py) sees every operation, none in error."""
    import schemathesis
    from schemathesis.core.result import Err

    results = list(schemathesis.openapi.from_dict(spec).get_all_operations())
    errors = [str(r.err()) for r in results if isinstance(r, Err)]
    assert not errors and len(results) == len(operations(spec)), errors
