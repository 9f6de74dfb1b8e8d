"""The embedding cache skips the encoder on repeat images; API keys gate the native API and isolate tenants."""

from __future__ import annotations

import requests

from tests.integration.conftest import API_KEY, OTHER_KEY, png_b64, random_image

TEXT = {"type": "concept", "text": "cat"}


def _post(url: str, body: dict, key: str | None = API_KEY) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{url}/v1/image/segment", json=body, headers=headers, timeout=120)


def _encoded(url: str) -> int:
    return requests.get(f"{url}/v1/stats", headers={"x-api-key": API_KEY}, timeout=30).json()["encoder"]["images"]


def test_missing_and_wrong_keys_are_401(providers_url):
    body = {"image": png_b64(random_image(300)), "prompts": [TEXT]}
    missing, wrong = _post(providers_url, body, None), _post(providers_url, body, "nope")
    assert missing.status_code == wrong.status_code == 401
    assert missing.json()["error"]["code"] == "unauthorized" and "Bearer" in missing.json()["error"]["message"]
    assert wrong.json()["error"]["message"] == "invalid API key"
    ok = requests.post(f"{providers_url}/v1/image/segment", json=body, headers={"x-api-key": API_KEY}, timeout=120)
    assert ok.status_code == 200


def test_image_id_skips_the_encoder_and_the_image(providers_url):
    body = {"image": png_b64(random_image(301)), "image_id": "img-301", "prompts": [TEXT], "threshold": 0.05}
    first = _post(providers_url, body)
    assert first.status_code == 200 and first.json()["image_id"] == "img-301"
    before = _encoded(providers_url)
    again = _post(providers_url, {"image_id": "img-301", "prompts": [TEXT], "threshold": 0.05})
    assert again.status_code == 200, again.text
    assert _encoded(providers_url) == before, "a cached image_id must not run the encoder"
    assert again.json()["prompts"] == first.json()["prompts"]
    assert again.json()["timings_ms"]["cache_hit"] == 1.0


def test_same_bytes_hit_the_digest_cache(providers_url):
    body = {"image": png_b64(random_image(302)), "prompts": [TEXT]}
    first = _post(providers_url, body)
    before = _encoded(providers_url)
    second = _post(providers_url, body)
    assert second.status_code == 200 and _encoded(providers_url) == before
    assert second.json()["image_id"] == first.json()["image_id"]


def test_another_key_never_sees_the_cached_embedding(providers_url):
    image = png_b64(random_image(303))
    assert _post(providers_url, {"image": image, "image_id": "shared-name", "prompts": [TEXT]}).status_code == 200
    hidden = _post(providers_url, {"image_id": "shared-name", "prompts": [TEXT]}, OTHER_KEY)
    assert hidden.status_code == 404 and "shared-name" in hidden.json()["error"]["message"]
    before = _encoded(providers_url)
    own = _post(providers_url, {"image": image, "image_id": "shared-name", "prompts": [TEXT]}, OTHER_KEY)
    assert own.status_code == 200 and _encoded(providers_url) == before + 1, "other tenant must encode its own"


def test_a_bad_prompt_is_refused_before_the_encoder_runs(providers_url):
    before = _encoded(providers_url)
    body = {"image": png_b64(random_image(304)), "prompts": [{"type": "concept", "boxes": [[500, 500, 600, 600]]}]}
    response = _post(providers_url, body)
    assert response.status_code == 400 and "outside" in response.json()["error"]["message"]
    assert _encoded(providers_url) == before, "an image whose prompts are invalid must not be encoded"
