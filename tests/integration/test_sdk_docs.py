"""The Python blocks of docs/sdks.md run as a reader would run them: against a live app (keys on), in a folder
holding `image.png`, with the docs' server URL and key placeholder replaced."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest

from tests.integration.conftest import API_KEY, image_bytes

pytestmark = pytest.mark.integration

PAGE = Path(__file__).resolve().parents[2] / "docs" / "sdks.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), flags=re.S | re.M)
MODULES = {"inference_sdk": "inference-sdk", "segmind": "segmind", "gradio_client": "gradio_client"}


def test_the_page_shows_each_sdks_setup():
    assert len(BLOCKS) == 3
    for block, module in zip(BLOCKS, MODULES):
        lines = block.splitlines()
        assert lines[0].startswith(f"from {module} import") and "YOUR_KEY" in lines[1] and "127.0.0.1:8000" in lines[1]


@pytest.mark.parametrize("block", BLOCKS, ids=list(MODULES.values()))
def test_block_runs(block: str, providers_url, tmp_path):
    module = block.split()[1]
    pytest.importorskip(module, reason=f"{MODULES[module]} is a test dependency")
    (tmp_path / "image.png").write_bytes(image_bytes(3, height=48, width=64))
    code = block.replace("http://127.0.0.1:8000", providers_url).replace("YOUR_KEY", API_KEY)
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            namespace: dict = {}
            exec(compile(code, f"docs/sdks.md ({MODULES[module]})", "exec"), namespace)  # noqa: S102 - our own docs
    finally:
        os.chdir(here)
    answers = [v for k, v in namespace.items() if k in ("result", "clicks", "embedded", "output", "direct", "both")]
    assert answers and all(isinstance(a, dict) and a for a in answers)
