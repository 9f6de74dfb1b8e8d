"""serve_app.image.roi_align against torchvision.ops.roi_align itself, on CUDA and CPU."""

from __future__ import annotations

import pytest
import torch

from serve_app.image.roi_align import roi_align

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
torchvision = pytest.importorskip("torchvision")


def _random_case(seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [2, 16, 40, 48] and 96 rois: partly outside the map, a quarter under a pixel, some reversed."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 16, 40, 48, generator=generator)
    count = 96
    centre = torch.rand(count, 2, generator=generator) * torch.tensor([56.0, 48.0]) - 4.0
    size = torch.rand(count, 2, generator=generator) * 40.0 + 0.05
    size[: count // 4] = torch.rand(count // 4, 2, generator=generator) * 0.9 + 0.05
    size[-8:] = -size[-8:]
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    batch_index = torch.randint(0, 2, (count, 1), generator=generator).float()
    return features.to(device), torch.cat([batch_index, boxes], dim=1).to(device)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
def test_float32_matches_torchvision(device: str, aligned: bool, sampling_ratio: int) -> None:
    features, rois = _random_case(seed=100 + sampling_ratio + 10 * aligned, device=device)

    got = roi_align(features, rois, (7, 5), spatial_scale=1.0, sampling_ratio=sampling_ratio, aligned=aligned)

    expected = torchvision.ops.roi_align(features, rois, (7, 5), 1.0, sampling_ratio, aligned)
    assert got.shape == expected.shape == (96, 16, 7, 5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("aligned", [False, True])
def test_list_of_boxes_and_spatial_scale_match_torchvision(device: str, aligned: bool) -> None:
    features, rois = _random_case(seed=5, device=device)
    per_image = [rois[rois[:, 0] == i, 1:] * 4.0 for i in range(2)]

    got = roi_align(features, per_image, 7, spatial_scale=0.25, aligned=aligned)

    expected = torchvision.ops.roi_align(features, per_image, 7, spatial_scale=0.25, aligned=aligned)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
def test_half_precision_on_cuda_is_close_to_torchvision(dtype: torch.dtype, aligned: bool, sampling_ratio: int) -> None:
    features, rois = _random_case(seed=21, device="cuda")
    features, rois = features.to(dtype), rois.to(dtype)

    got = roi_align(features, rois, 7, sampling_ratio=sampling_ratio, aligned=aligned)

    # torchvision on the same (rounded) values in float32: the exact answer before rounding the output.
    expected = torchvision.ops.roi_align(features.float(), rois.float(), 7, 1.0, sampling_ratio, aligned)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)
