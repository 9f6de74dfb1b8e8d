"""Weights load through the same path real ones use; bad SAM3_MODEL values stop start-up with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serve_app.core.config import Config
from serve_app.image.models import load_bundle, save_bundle
from tests.integration.conftest import deploy, png_b64, random_image, segment, undeploy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("sam3-saved")
    save_bundle(load_bundle(Config()), directory)
    return directory


def test_saved_directory_has_the_real_layout(saved_dir):
    names = {p.name for p in saved_dir.iterdir()}
    assert "config.json" in names and any(n.endswith(".safetensors") for n in names)
    assert '"model_type": "sam3_video"' in (saved_dir / "config.json").read_text()


def test_saved_directory_loads_the_same_weights(saved_dir):
    original, loaded = load_bundle(Config()), load_bundle(Config(model=str(saved_dir)))
    a, b = original.video.state_dict(), loaded.video.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_saved_directory_serves_identical_results(serve_instance, app_url, saved_dir):
    saved_url = deploy("saved", Config(model=str(saved_dir), web_ui=False, video_warm_sessions=0), serve_instance)
    body = {
        "image": png_b64(random_image(42)),
        "prompts": [
            {"type": "concept", "text": "yellow bus"},
            {"type": "concept", "text": "bus", "boxes": [[10, 10, 60, 50]]},
            {"type": "visual", "points": [[40, 40]], "multimask": True},
        ],
        "threshold": 0.05,
    }
    from_tiny, from_dir = segment(app_url, body), segment(saved_url, body)
    assert from_tiny.status_code == from_dir.status_code == 200, from_dir.text
    strip = lambda r: [p["instances"] for p in r.json()["prompts"]]  # noqa: E731
    try:
        assert strip(from_tiny) == strip(from_dir)
        assert any(strip(from_dir)), "results must not be empty"
    finally:
        undeploy("saved")


def _start(model: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SAM3_MODEL": model, "SAM3_PORT": "1", **(extra_env or {})}
    return subprocess.run(
        [sys.executable, "-m", "serve_app.main"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_missing_directory_fails_startup_clearly(tmp_path):
    result = _start(str(tmp_path / "no-such-model"))
    assert result.returncode == 2
    assert "directory does not exist" in result.stderr and "SAM3_MODEL" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_hub_id_fails_startup_clearly():
    # a hub that refuses connections at once: the same failure as no network, without the wait
    result = _start("someone/sam3-finetune", {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "3"})
    assert result.returncode == 2
    assert "could not load SAM3 model 'someone/sam3-finetune'" in result.stderr
    assert "SAM3_MODEL" in result.stderr and "Traceback" not in result.stderr


def test_directory_without_config_fails_startup_clearly(tmp_path):
    result = _start(str(tmp_path))
    assert result.returncode == 2 and "no config.json" in result.stderr
