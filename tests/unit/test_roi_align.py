"""roi_align against a loop-by-loop transcription of torchvision's kernel, and the SAM3 fallback hook."""

from __future__ import annotations

import importlib
import math
import sys
import types

import numpy as np
import pytest
import torch

from serve_app.image.roi_align import install_roi_align_fallback, roi_align

F32 = np.float32


def _bilinear(feature: np.ndarray, y: F32, x: F32) -> np.ndarray:
    """The kernel's bilinear_interpolate for one point, all channels."""
    _, height, width = feature.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(feature.shape[0])
    y, x = max(y, F32(0)), max(x, F32(0))
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = F32(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = F32(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - F32(y_low), x - F32(x_low)
    hy, hx = F32(1) - ly, F32(1) - lx
    return (
        hy * hx * feature[:, y_low, x_low]
        + hy * lx * feature[:, y_low, x_high]
        + ly * hx * feature[:, y_high, x_low]
        + ly * lx * feature[:, y_high, x_high]
    )


def reference_roi_align(features, rois, out_h, out_w, spatial_scale, sampling_ratio, aligned):
    """Per roi, per bin, per sample point, as torchvision's roi_align_kernel does it (float32 geometry)."""
    features = features.double().numpy()
    out = np.zeros((rois.shape[0], features.shape[1], out_h, out_w))
    offset = F32(0.5) if aligned else F32(0)
    for k, roi in enumerate(rois.numpy().astype(F32)):
        feature = features[int(roi[0])]
        x1, y1, x2, y2 = (c * F32(spatial_scale) - offset for c in roi[1:])
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w, roi_h = max(roi_w, F32(1)), max(roi_h, F32(1))
        bin_h, bin_w = roi_h / F32(out_h), roi_w / F32(out_w)
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / F32(out_h))
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / F32(out_w))
        count = max(grid_h * grid_w, 1)
        for ph in range(out_h):
            for pw in range(out_w):
                total = np.zeros(feature.shape[0])
                for iy in range(grid_h):
                    y = y1 + F32(ph) * bin_h + F32(iy + 0.5) * bin_h / F32(grid_h)
                    for ix in range(grid_w):
                        x = x1 + F32(pw) * bin_w + F32(ix + 0.5) * bin_w / F32(grid_w)
                        total += _bilinear(feature, y, x)
                out[k, :, ph, pw] = total / count
    return torch.from_numpy(out).float()


def _random_boxes(generator: torch.Generator, count: int, height: int, width: int) -> torch.Tensor:
    """xyxy boxes: many partly outside the map, some under a pixel, one reversed, one far outside."""
    centre = torch.rand(count, 2, generator=generator) * torch.tensor([width + 6.0, height + 6.0]) - 3.0
    size = torch.rand(count, 2, generator=generator) * 14.0 + 0.05
    size[: count // 4] = torch.rand(count // 4, 2, generator=generator) * 0.9 + 0.05
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    boxes[-1] = torch.tensor([width + 2.5, -4.0, width + 6.0, -1.5])
    boxes[-2] = torch.tensor([6.0, 5.0, 2.5, 1.0])
    return boxes


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("box_form", ["list", "tensor"])
def test_matches_kernel_reference(aligned: bool, sampling_ratio: int, box_form: str) -> None:
    generator = torch.Generator().manual_seed(7)
    features = torch.randn(2, 3, 9, 11, generator=generator)
    per_image = [_random_boxes(generator, 8, 9, 11), _random_boxes(generator, 5, 9, 11)]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(per_image)])
    boxes = per_image if box_form == "list" else rois

    got = roi_align(features, boxes, (3, 4), spatial_scale=1.0, sampling_ratio=sampling_ratio, aligned=aligned)

    expected = reference_roi_align(features, rois, 3, 4, 1.0, sampling_ratio, aligned)
    assert got.shape == (13, 3, 3, 4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("aligned", [False, True])
def test_spatial_scale_and_square_output(aligned: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(1, 4, 8, 8, generator=generator)
    boxes = [_random_boxes(generator, 6, 32, 32)]
    rois = torch.cat([torch.zeros(6, 1), boxes[0]], dim=1)

    got = roi_align(features, boxes, 2, spatial_scale=0.25, sampling_ratio=-1, aligned=aligned)

    expected = reference_roi_align(features, rois, 2, 2, 0.25, -1, aligned)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampling_ratio", [1, -1])
def test_samples_on_the_validity_boundary(sampling_ratio: int) -> None:
    # With one sample per bin these boxes put samples exactly at y or x = -1, = H or W, and in (-1, 0).
    features = torch.arange(2 * 5 * 6, dtype=torch.float32).reshape(1, 2, 5, 6)
    rois = torch.tensor(
        [
            [0, 0.0, -1.5, 1.0, -0.5],
            [0, -1.5, 0.0, -0.5, 1.0],
            [0, 2.0, 4.5, 3.0, 5.5],
            [0, 5.5, 2.0, 6.5, 3.0],
            [0, -1.6, -1.6, -0.6, -0.6],
            [0, 5.6, 4.6, 6.6, 5.6],
            [0, -0.9, -0.4, 0.1, 0.6],
        ]
    )

    got = roi_align(features, rois, 1, sampling_ratio=sampling_ratio, aligned=False)

    expected = reference_roi_align(features, rois, 1, 1, 1.0, sampling_ratio, False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert got[4].abs().sum() == 0 and got[5].abs().sum() == 0
    torch.testing.assert_close(got[0, :, 0, 0], (features[0, :, 0, 0] + features[0, :, 0, 1]) / 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_returns_input_dtype(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(11)
    features = torch.randn(1, 3, 9, 11, generator=generator).to(dtype)
    boxes = [_random_boxes(generator, 6, 9, 11).to(dtype)]

    got = roi_align(features, boxes, 3, aligned=True)

    expected = roi_align(features.float(), [boxes[0].float()], 3, aligned=True)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)


def test_no_boxes_gives_empty_output() -> None:
    features = torch.randn(2, 3, 9, 11)

    got = roi_align(features, [torch.zeros(0, 4), torch.zeros(0, 4)], (2, 5))

    assert got.shape == (0, 3, 2, 5)


def test_image_without_boxes_is_skipped() -> None:
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(3, 2, 9, 11, generator=generator)
    per_image = [torch.zeros(0, 4), _random_boxes(generator, 4, 9, 11), _random_boxes(generator, 4, 9, 11)]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(per_image)])

    got = roi_align(features, per_image, 2, sampling_ratio=2)

    torch.testing.assert_close(got, reference_roi_align(features, rois, 2, 2, 1.0, 2, False), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad_boxes", [torch.zeros(3, 4), [torch.zeros(3, 5)]])
def test_malformed_boxes_are_rejected(bad_boxes) -> None:
    with pytest.raises(ValueError, match="boxes"):
        roi_align(torch.zeros(1, 1, 4, 4), bad_boxes, 2)


def _sam3_modules():
    # import_module, not `from package import module`: transformers' lazy packages hand back a backend-check stub.
    return (
        importlib.import_module("transformers.models.sam3.modeling_sam3"),
        importlib.import_module("transformers.models.sam3_lite_text.modeling_sam3_lite_text"),
    )


def test_install_does_nothing_when_torchvision_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    modules = _sam3_modules()
    for module in modules:
        monkeypatch.delattr(module, "torchvision", raising=False)
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))

    assert install_roi_align_fallback() is False
    assert not any(hasattr(module, "torchvision") for module in modules)


def test_install_lends_roi_align_when_torchvision_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    modules = _sam3_modules()
    for module in modules:
        monkeypatch.delattr(module, "torchvision", raising=False)
    monkeypatch.setitem(sys.modules, "torchvision", None)

    assert install_roi_align_fallback() is True
    shims = [module.torchvision for module in modules]
    assert install_roi_align_fallback() is True

    assert all(shim.ops.roi_align is roi_align for shim in shims)
    assert [module.torchvision for module in modules] == shims


@pytest.fixture(scope="module")
def tiny_sam3():
    from transformers import Sam3Config, Sam3Model

    vit = dict(
        model_type="sam3_vit_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, image_size=112, patch_size=14, window_size=4, global_attn_indexes=[1],
        pretrain_image_size=112,
    )  # fmt: skip
    vision = dict(
        model_type="sam3_vision_model", backbone_config=vit, fpn_hidden_size=32,
        backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]],
    )  # fmt: skip
    text = dict(
        model_type="clip_text_model", vocab_size=1000, hidden_size=32, intermediate_size=64, projection_dim=32,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32, bos_token_id=998,
        eos_token_id=999, pad_token_id=999,
    )  # fmt: skip
    small = dict(hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=64)
    config = Sam3Config(
        vision_config=vision,
        text_config=text,
        geometry_encoder_config=small,
        detr_encoder_config=small,
        detr_decoder_config=dict(small, num_queries=16),
        mask_decoder_config=dict(hidden_size=32, num_attention_heads=2),
    )
    torch.manual_seed(0)
    return Sam3Model(config).eval()


def test_sam3_runs_with_exemplar_boxes_after_install(tiny_sam3, monkeypatch: pytest.MonkeyPatch) -> None:
    install_roi_align_fallback()
    modeling_sam3 = _sam3_modules()[0]

    calls = []
    lent = modeling_sam3.torchvision.ops.roi_align

    def spy(*args, **kwargs):
        calls.append(lent(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(modeling_sam3.torchvision.ops, "roi_align", spy)
    generator = torch.Generator().manual_seed(1)
    inputs = dict(
        pixel_values=torch.randn(1, 3, 112, 112, generator=generator),
        input_ids=torch.randint(0, 998, (1, 32), generator=generator),
        attention_mask=torch.ones(1, 32, dtype=torch.long),
        input_boxes_labels=torch.ones(1, 1, dtype=torch.long),
    )

    with torch.no_grad():
        first = tiny_sam3(**inputs, input_boxes=torch.tensor([[[0.5, 0.5, 0.2, 0.2]]]))
        moved = tiny_sam3(**inputs, input_boxes=torch.tensor([[[0.3, 0.6, 0.2, 0.2]]]))

    assert [pooled.shape for pooled in calls] == [(1, 32, 7, 7), (1, 32, 7, 7)]
    assert not torch.allclose(calls[0], calls[1])
    assert first.pred_logits.shape == (1, 16)
    assert not torch.allclose(first.pred_logits, moved.pred_logits)
    assert not torch.allclose(first.pred_masks, moved.pred_masks)
