"""Model loading pieces: device/dtype choice, the tiny tokenizer, clear failures."""

from __future__ import annotations

import pytest
import torch

from serve_app.core.config import Config
from serve_app.core.errors import ModelLoadError
from serve_app.image.models import HashTokenizer, load_bundle, resolve_device


def test_auto_is_float32_on_cpu_and_overridable():
    if torch.cuda.is_available():
        assert resolve_device(Config()) == (torch.device("cuda"), torch.bfloat16)
    else:
        assert resolve_device(Config()) == (torch.device("cpu"), torch.float32)
    assert resolve_device(Config(device="cpu", dtype="bfloat16")) == (torch.device("cpu"), torch.bfloat16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="SAM3_DEVICE=cuda.*no CUDA device"):
        resolve_device(Config(device="cuda"))


def test_hash_tokenizer_separates_words_and_pads_like_sam3():
    tok = HashTokenizer(1000)
    ids, mask = tok(["a red car", "a blue car", "A RED car!"])
    assert ids.shape == mask.shape == (3, 32)
    assert not torch.equal(ids[0], ids[1]) and torch.equal(ids[0], ids[2])
    assert ids[0, 0] == tok.bos_id and ids[0, 4] == tok.eos_id and mask[0].tolist() == [1] * 5 + [0] * 27
    assert int(ids.max()) < 1000


def test_tiny_random_is_deterministic():
    a, b = load_bundle(Config()), load_bundle(Config())
    assert all(torch.equal(x, y) for x, y in zip(a.video.state_dict().values(), b.video.state_dict().values()))
    assert a.tracker.vision_encoder.backbone is a.backbone and a.video_tracker.vision_encoder.backbone is a.backbone
