"""Health, readiness, stats and the self-documenting OpenAPI page."""

from __future__ import annotations

import requests


def test_health_and_readiness(app_url):
    assert requests.get(f"{app_url}/healthz", timeout=30).json() == {"status": "ok"}
    ready = requests.get(f"{app_url}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "model": "tiny-random"}


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
