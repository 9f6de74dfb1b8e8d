"""The web UI in a real headless Chromium (Playwright driving Debian's `chromium`): key, upload, prompt, Segment,
and the overlay appears with the instances the HTTP API finds. Saves a screenshot to tmp/ui-screenshot.png."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import requests

from tests.integration.conftest import API_KEY, find_image_seed, image_bytes, png_b64, random_image

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "tmp" / "ui-screenshot.png"
CHROMIUM = os.environ.get("SAM3_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
HEIGHT, WIDTH = 240, 320


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (Debian), or set SAM3_TEST_CHROMIUM")
    with playwright_api.sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def test_upload_prompt_segment_shows_the_overlay(browser, providers_url, tmp_path):
    seed = find_image_seed(["kitten"], 0.5, HEIGHT, WIDTH)
    path = tmp_path / "kittens.png"
    path.write_bytes(image_bytes(seed, height=HEIGHT, width=WIDTH))
    expected = requests.post(f"{providers_url}/api/predict", timeout=120,
                             json={"data": [png_b64(random_image(seed, HEIGHT, WIDTH)), "kitten", 0.5]},
                             headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"][0]["num_objects"]
    assert expected >= 1

    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.set_default_timeout(120_000)
    page.goto(f"{providers_url}/ui/")
    page.locator("#api-key input, #api-key textarea").first.fill(API_KEY)  # keys are on for this app
    page.locator("#image-in input[type=file]").set_input_files(str(path))
    page.locator("#image-in img").first.wait_for(state="visible")  # uploaded and shown
    page.locator("#prompt input, #prompt textarea").first.fill("kitten")
    page.locator("#segment").click()

    page.locator("#summary").get_by_text(re.compile(r"\d+ instance\(s\) found")).wait_for()
    overlay = page.locator("#overlay img").first
    overlay.wait_for(state="visible")
    assert overlay.evaluate("img => img.naturalWidth") == WIDTH  # the image came back, at its own size
    assert page.locator("#summary").inner_text().strip() == f"{expected} instance(s) found"  # as the API answers
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    print(f"screenshot: {SCREENSHOT}")
    page.close()


def test_a_wrong_key_shows_the_apis_message(browser, providers_url, tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(image_bytes(1, height=HEIGHT, width=WIDTH))
    page = browser.new_page()
    page.set_default_timeout(120_000)
    page.goto(f"{providers_url}/ui/")
    page.locator("#api-key input, #api-key textarea").first.fill("not-a-key")
    page.locator("#image-in input[type=file]").set_input_files(str(path))
    page.locator("#image-in img").first.wait_for(state="visible")
    page.locator("#prompt input, #prompt textarea").first.fill("kitten")
    page.locator("#segment").click()
    page.get_by_text("invalid API key").first.wait_for()
    page.close()
