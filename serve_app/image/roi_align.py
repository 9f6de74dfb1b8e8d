"""Pure-torch `torchvision.ops.roi_align`, and a hook that lends it to transformers' SAM3 when torchvision is absent."""

from __future__ import annotations

import importlib
import pkgutil
import types
from pathlib import Path

import torch
from torch import Tensor


def roi_align(
    input: Tensor,
    boxes: Tensor | list[Tensor] | tuple[Tensor, ...],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """Same results as `torchvision.ops.roi_align`: returns Tensor[K, C, oh, ow] in the input's dtype.

    `boxes` is a Tensor[K, 5] of (batch_index, x1, y1, x2, y2) or a list of Tensor[Ki, 4] xyxy, one per image.
    """
    if input.dim() != 4:
        raise ValueError(f"roi_align expects input of shape [N, C, H, W], got {tuple(input.shape)}")
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    compute_dtype = torch.promote_types(input.dtype, torch.float32)
    rois = _to_rois(boxes, input.device, compute_dtype)
    num_images, channels, height, width = input.shape
    num_rois = rois.shape[0]
    if num_rois == 0:
        return input.new_zeros((0, channels, out_h, out_w))

    offset = 0.5 if aligned else 0.0
    batch_index = rois[:, 0].long()
    x1, y1, x2, y2 = (rois[:, i] * spatial_scale - offset for i in range(1, 5))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)

    # Bilinear sampling over a product grid is separable: each roi's output is Wy @ F @ Wx^T, where Wy (Wx)
    # sums, per output row (column), the interpolation weights of that bin's sample rows (columns).
    weights_y, grid_h = _axis_weights(y1, roi_h, out_h, height, sampling_ratio)
    weights_x, grid_w = _axis_weights(x1, roi_w, out_w, width, sampling_ratio)
    count = (grid_h * grid_w).clamp(min=1).to(compute_dtype)
    weights_y = weights_y / count[:, None, None]

    features = input.to(compute_dtype)
    if num_images == 1:
        pooled = torch.einsum("kph,chw,kqw->kcpq", weights_y, features[0], weights_x)
    else:
        pooled = features.new_zeros((num_rois, channels, out_h, out_w))
        for image in range(num_images):
            picked = torch.nonzero(batch_index == image).squeeze(1)
            if picked.numel():
                pooled[picked] = torch.einsum(
                    "kph,chw,kqw->kcpq", weights_y[picked], features[image], weights_x[picked]
                )
    return pooled.contiguous().to(input.dtype)


def _to_rois(boxes: Tensor | list[Tensor] | tuple[Tensor, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """Boxes in either accepted form as a Tensor[K, 5] of (batch_index, x1, y1, x2, y2)."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"roi_align expects boxes Tensor[K, 5], got shape {tuple(boxes.shape)}")
        return boxes.to(device=device, dtype=dtype)
    parts = []
    for image, image_boxes in enumerate(boxes):
        if image_boxes.dim() != 2 or image_boxes.shape[1] != 4:
            raise ValueError(f"roi_align expects each image's boxes as Tensor[Ki, 4], got {tuple(image_boxes.shape)}")
        image_boxes = image_boxes.to(device=device, dtype=dtype)
        index = torch.full_like(image_boxes[:, :1], image)
        parts.append(torch.cat([index, image_boxes], dim=1))
    if not parts:
        return torch.zeros((0, 5), device=device, dtype=dtype)
    return torch.cat(parts, dim=0)


def _axis_weights(
    start: Tensor, roi_size: Tensor, bins: int, length: int, sampling_ratio: int
) -> tuple[Tensor, Tensor]:
    """Per-roi matrix [K, bins, length] of summed bilinear weights along one axis, and the per-roi sample count."""
    bin_size = roi_size / bins
    if sampling_ratio > 0:
        grid = torch.full_like(start, sampling_ratio, dtype=torch.long)
        max_grid = sampling_ratio
    else:
        # Adaptive: ceil(roi_size / bins) samples per bin, per roi; a roi of size <= 0 (aligned) samples nothing.
        grid = torch.ceil(roi_size / bins).clamp(min=0).long()
        max_grid = int(grid.max().item())
    num_rois = start.shape[0]
    weights = start.new_zeros((num_rois, bins, length))
    if max_grid == 0:
        return weights, grid

    bin_index = torch.arange(bins, device=start.device, dtype=start.dtype)[None, :, None]
    sample_index = torch.arange(max_grid, device=start.device, dtype=start.dtype)[None, None, :]
    grid_f = grid.clamp(min=1).to(start.dtype)[:, None, None]
    # Same operation order as the kernel: start + p * bin + (i + 0.5) * bin / grid.
    pos = start[:, None, None] + bin_index * bin_size[:, None, None]
    pos = pos + (sample_index + 0.5) * bin_size[:, None, None] / grid_f
    in_grid = sample_index < grid[:, None, None]
    valid = in_grid & (pos >= -1.0) & (pos <= length)

    pos = pos.clamp(min=0.0)
    low = pos.floor().clamp(max=length - 1)
    at_edge = low >= length - 1
    pos = torch.where(at_edge, low, pos)
    frac = pos - low
    # Invalid samples (NaN boxes included) get weight 0 at an in-range index.
    low_index = torch.where(valid, low, 0.0).long()
    high_index = torch.where(at_edge, low_index, low_index + 1).clamp(max=length - 1)
    weights.scatter_add_(2, low_index, torch.where(valid, 1.0 - frac, 0.0))
    weights.scatter_add_(2, high_index, torch.where(valid, frac, 0.0))
    return weights, grid


_ROI_ALIGN_CALL = "torchvision.ops.roi_align"


def _sam3_modules_using_roi_align() -> list[str]:
    """Names of the transformers sam3* modeling modules whose source calls torchvision.ops.roi_align."""
    import transformers.models as models

    names = []
    for package in pkgutil.iter_modules(models.__path__):
        if not package.name.startswith("sam3"):
            continue
        for path in sorted(Path(models.__path__[0], package.name).glob("modeling_*.py")):
            if _ROI_ALIGN_CALL in path.read_text(encoding="utf-8"):
                names.append(f"{models.__name__}.{package.name}.{path.stem}")
    return names


def install_roi_align_fallback() -> bool:
    """Lend `roi_align` to transformers' SAM3 modules when torchvision is missing; True if torchvision is missing."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        return False
    shim = types.SimpleNamespace(ops=types.SimpleNamespace(roi_align=roi_align))
    for name in _sam3_modules_using_roi_align():
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if not hasattr(module, "torchvision"):
            module.torchvision = shim
    return True
