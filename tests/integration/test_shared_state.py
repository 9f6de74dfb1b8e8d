"""Any replica serves any request: follow-ups by image_id, logits, media URLs and queue results across 3 ingress
replicas, and the queue surviving a JobStore kill (SQLite here, Redis too); a whole-service restart is
test_service_restart.py."""

from __future__ import annotations

import time

import pytest
import requests

from serve_app.core.config import Config
from tests.integration.conftest import API_KEY, deploy, png_b64, random_image, undeploy

FOLLOW_UPS = 20
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def encoded_images(url: str) -> int:
    return requests.get(f"{url}/v1/stats", headers=AUTH, timeout=30).json()["encoder"]["images"]


def serving_replicas(url: str, tries: int = 30) -> set[str]:
    return {requests.get(f"{url}/v1/stats", headers=AUTH, timeout=30).json()["ingress_replica"] for _ in range(tries)}


def test_the_provider_app_really_has_three_ingress_replicas_in_use(providers_url):
    assert len(serving_replicas(providers_url)) >= 2, "requests must spread over the replicas for these tests to mean it"


def test_native_image_id_follow_ups_succeed_on_every_replica(providers_url):
    image = png_b64(random_image(301))
    first = requests.post(f"{providers_url}/v1/image/segment", headers=AUTH, timeout=120, json={
        "image": image, "image_id": "shared-301", "prompts": [{"type": "concept", "text": "a square"}]})
    assert first.status_code == 200, first.text
    codes = []
    for i in range(FOLLOW_UPS):
        body = {"image_id": "shared-301", "prompts": [{"type": "visual", "points": [[10 + i, 20]], "point_labels": [1]}]}
        response = requests.post(f"{providers_url}/v1/image/segment", headers=AUTH, json=body, timeout=120)
        codes.append(response.status_code)
        assert response.status_code != 200 or response.json()["timings_ms"]["cache_hit"] == 1.0
    assert codes == [200] * FOLLOW_UPS, codes


def test_roboflow_embeddings_and_logits_follow_ups_succeed_on_every_replica(providers_url):
    image = {"type": "base64", "value": png_b64(random_image(302))}
    embed = requests.post(f"{providers_url}/sam3/embed_image?api_key={API_KEY}", timeout=120,
                          json={"image": image, "image_id": "rf-shared-302"})
    assert embed.status_code == 200, embed.text
    encoded = encoded_images(providers_url)
    codes = []
    for i in range(FOLLOW_UPS):  # click by click: each answer saves its logits, the next refines with them
        clicks = [{"x": 10 + j, "y": 20, "positive": True} for j in range(i % 4 + 1)]
        body = {"image": image, "image_id": "rf-shared-302", "format": "rle", "prompts": {"prompts": [{"points": clicks}]},
                "save_logits_to_cache": True, "load_logits_from_cache": True}
        codes.append(requests.post(f"{providers_url}/sam3/visual_segment?api_key={API_KEY}", json=body,
                                   timeout=120).status_code)
    assert codes == [200] * FOLLOW_UPS, codes
    assert encoded_images(providers_url) == encoded, "every replica found the embedding: the encoder never ran again"
    stats = requests.get(f"{providers_url}/v1/stats", headers=AUTH, timeout=30).json()
    assert stats["logits_cache"]["entries"] >= 1 and stats["logits_cache"]["hits"] >= 1


def test_oxen_media_urls_resolve_on_every_replica(providers_url, image_server):
    urls = []
    for i in range(FOLLOW_UPS):
        body = {"model": "sam-3-image", "input_image": f"{image_server}/img/{310 + i % 3}.png?h=96&w=128", "prompt": "the ox"}
        response = requests.post(f"{providers_url}/api/ai/images/edit", headers=AUTH, json=body, timeout=120)
        assert response.status_code == 200, response.text
        urls.append(response.json()["images"][0]["url"])
    codes = [requests.get(url, timeout=30).status_code for url in urls]
    assert codes == [200] * FOLLOW_UPS, codes


def _poll(url: str, gen_id: str, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        response = requests.get(f"{url}/api/ai/queue/{gen_id}", headers=AUTH, timeout=30)
        if response.status_code == 200 and response.json()["status"] in ("succeeded", "failed", "cancelled"):
            return response.json()
        assert response.status_code in (200, 503, 504) and time.monotonic() < deadline, response.text
        time.sleep(0.3)


def _enqueue(url: str, image_server: str, seed: int) -> str:
    body = {"model": "sam-3-image", "input_image": f"{image_server}/img/{seed}.png?h=96&w=128", "prompt": "the ox"}
    response = requests.post(f"{url}/api/ai/queue", headers=AUTH, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["generations"][0]["generation_id"]


def _kill_job_store(app: str) -> None:
    import ray

    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].startswith(f"SERVE_REPLICA::{app}#JobStore#")]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


@pytest.fixture(scope="module")
def redis_app(serve_instance, redis_url):
    yield deploy("redisstate", Config(api_keys=[API_KEY], url_allowlist=["127.0.0.1"], state_url=redis_url,
                                      ingress_replicas=2, encoder_batch_wait_timeout_s=0.01, web_ui=False), serve_instance)
    undeploy("redisstate")


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_jobs_and_results_survive_a_job_store_kill(backend, providers_url, image_server, request):
    url, app = (providers_url, "providers") if backend == "sqlite" else (request.getfixturevalue("redis_app"), "redisstate")
    done = _enqueue(url, image_server, 320)
    finished = _poll(url, done)
    assert finished["status"] == "succeeded", finished
    pending = [_enqueue(url, image_server, 321 + i) for i in range(3)]  # queued or running when the store dies
    _kill_job_store(app)
    again = _poll(url, done)
    assert again["status"] == "succeeded" and again["result"] == finished["result"], "a finished result was lost"
    assert requests.get(again["result"]["images"][0]["url"], timeout=30).status_code == 200
    outcomes = [_poll(url, gen_id) for gen_id in pending]
    assert [o["status"] for o in outcomes] == ["succeeded"] * 3, outcomes
