"""Health, readiness, stats and the self-documenting OpenAPI page."""

from __future__ import annotations

import requests


def test_health_and_readiness(app_url):
    assert requests.get(f"{app_url}/healthz", timeout=30).json() == {"status": "ok"}
    ready = requests.get(f"{app_url}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "model": "tiny-random", "models": ["sam3"], "default_model": "sam3"}


def test_openapi_documents_every_front_door(app_url):
    spec = requests.get(f"{app_url}/openapi.json", timeout=30).json()
    for path in ["/v1/image/segment", "/v1/video/sessions", "/v1/video/sessions/{session_id}/propagate",
                 "/api/ai/images/edit", "/v1/sam3-image", "/sam3/concept_segment", "/sam3/visual_segment",
                 "/sam3/embed_image", "/api/predict", "/api/sam2_compatible"]:
        assert path in spec["paths"], path
    fields = spec["components"]["schemas"]["SegmentRequestIn"]["properties"]
    assert all(f.get("description") for f in fields.values()), "every native field is described"
    assert requests.get(f"{app_url}/docs", timeout=30).status_code == 200


def test_stats_report_batches_and_caches(app_url):
    stats = requests.get(f"{app_url}/v1/stats", timeout=30).json()
    assert {"encoder", "decoder", "embedding_cache", "logits_cache", "video"} <= set(stats)
    assert {"hits", "misses", "entries", "bytes"} <= set(stats["embedding_cache"])


def test_an_app_without_the_web_ui_starts_no_ui_replica_and_says_so(app_url):
    """The main test app runs with web_ui=False (SAM3_WEB_UI): /ui is a clear 404 and no WebUI replica runs."""
    from ray import serve

    response = requests.get(f"{app_url}/ui/", timeout=30)
    assert response.status_code == 404 and "SAM3_WEB_UI=false" in response.json()["error"]["message"]
    assert "WebUI" not in serve.status().applications["main"].deployments
