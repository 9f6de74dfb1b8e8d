"""Reference results: transformers' SAM3 models called directly, with transformers' own post-processing."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from serve_app.image.codecs import rle_decode
from serve_app.image.geometry import normalized_cxcywh_from_xyxy
from serve_app.image.models import ModelBundle


def _hf_instance_postprocess(outputs, threshold: float, size: tuple[int, int]) -> list[dict]:
    """Sam3ImageProcessor.post_process_instance_segmentation, transcribed (its module imports torchvision)."""
    scores = outputs.pred_logits.sigmoid()
    if outputs.presence_logits is not None:
        scores = scores * outputs.presence_logits.sigmoid()
    masks_all = outputs.pred_masks.sigmoid()
    height, width = size
    boxes_all = outputs.pred_boxes * torch.tensor([width, height, width, height], dtype=torch.float32)
    results = []
    for score, boxes, masks in zip(scores, boxes_all, masks_all):
        keep = score > threshold
        score, boxes, masks = score[keep], boxes[keep], masks[keep]
        if len(masks) > 0:
            masks = F.interpolate(masks.unsqueeze(0), size=size, mode="bilinear", align_corners=False).squeeze(0)
        results.append({"scores": score, "boxes": boxes, "masks": (masks > 0.5).to(torch.long)})
    return results


@torch.inference_mode()
def concept_reference(
    bundle: ModelBundle, pixel_values: torch.Tensor, text: str | None, boxes: list, labels: list,
    size: tuple[int, int], threshold: float,
) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """(score, xyxy box, mask) per instance, best score first, from one direct Sam3Model call."""
    ids, mask = bundle.tokenizer([text or "visual"])
    kwargs = {}
    if boxes:
        height, width = size
        kwargs["input_boxes"] = torch.tensor(normalized_cxcywh_from_xyxy(boxes, width, height), dtype=torch.float32)[None]
        kwargs["input_boxes_labels"] = torch.tensor([[int(v) for v in labels]], dtype=torch.long)
    outputs = bundle.detector(pixel_values=pixel_values, input_ids=ids, attention_mask=mask, **kwargs)
    result = _hf_instance_postprocess(outputs, threshold, size)[0]
    order = torch.argsort(result["scores"], descending=True, stable=True)
    return [
        (float(result["scores"][i]), result["boxes"][i].numpy(), result["masks"][i].numpy().astype(bool))
        for i in order
    ]


@torch.inference_mode()
def visual_reference(
    bundle: ModelBundle, pixel_values: torch.Tensor, points: list, labels: list, box: list | None,
    size: tuple[int, int], multimask: bool,
) -> list[tuple[float, np.ndarray]]:
    """(iou score, mask) per candidate, best first, from one direct Sam3TrackerModel call."""
    height, width = size
    side = bundle.image_size
    kwargs = {}
    if points:
        pts = torch.tensor([[x * side / width, y * side / height] for x, y in points], dtype=torch.float32)
        kwargs["input_points"] = pts[None, None]
        kwargs["input_labels"] = torch.tensor(labels, dtype=torch.long)[None, None]
    if box is not None:
        x0, y0, x1, y1 = box
        kwargs["input_boxes"] = torch.tensor(
            [[[x0 * side / width, y0 * side / height, x1 * side / width, y1 * side / height]]]
        )
    out = bundle.tracker(pixel_values=pixel_values, multimask_output=multimask, **kwargs)
    # as Sam3TrackerProcessor.post_process_masks: bilinear on logits to the original size, > 0
    masks = F.interpolate(out.pred_masks[0], size, mode="bilinear", align_corners=False)[0] > 0
    scores = out.iou_scores[0, 0]
    order = torch.argsort(scores, descending=True, stable=True)
    return [(float(scores[i]), masks[i].numpy()) for i in order]


def served_instances(prompt_result: dict) -> list[tuple[float, np.ndarray, np.ndarray]]:
    return [
        (inst["score"], np.asarray(inst["box"]), rle_decode(inst["mask"])) for inst in prompt_result["instances"]
    ]


def hf_video_session(cls, engine, frames: list[np.ndarray]):
    """A transformers video inference session holding every preprocessed frame (what init_video_session stores)."""
    height, width = frames[0].shape[:2]
    video = torch.stack([engine.preprocess([f])[0] for f in frames])
    return cls(video=video, video_height=height, video_width=width, inference_device=engine.device,
               inference_state_device=engine.device, video_storage_device="cpu", dtype=engine.dtype)


@torch.inference_mode()
def click_tracking_reference(engine, frames: list[np.ndarray], object_id: int, points: list, labels: list,
                             box: list | None) -> dict[int, np.ndarray]:
    """{frame: mask} of one object clicked (and boxed) on frame 0 and tracked forward, by transformers'
    Sam3TrackerVideoModel driven directly (Sam3TrackerVideoProcessor's steps by hand)."""
    from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession

    height, width = frames[0].shape[:2]
    model, side = engine.bundle.video_tracker, engine.bundle.image_size
    hf = hf_video_session(Sam3TrackerVideoInferenceSession, engine, frames)
    coords, codes = [], []
    if box is not None:  # pixels -> the model square, box corners first (labels 2, 3)
        coords += [[box[0] * side / width, box[1] * side / height], [box[2] * side / width, box[3] * side / height]]
        codes += [2, 3]
    coords += [[x * side / width, y * side / height] for x, y in points]
    codes += list(labels)
    obj_idx = hf.obj_id_to_idx(object_id)
    hf.add_point_inputs(obj_idx, 0, {"point_coords": torch.tensor(coords).reshape(1, 1, -1, 2),
                                     "point_labels": torch.tensor(codes, dtype=torch.int32).reshape(1, 1, -1)})
    hf.obj_with_new_inputs = [object_id]
    model(inference_session=hf, frame_idx=0)

    def upsample(logits: torch.Tensor) -> np.ndarray:
        return (F.interpolate(logits.float()[:, None], (height, width), mode="bilinear", align_corners=False)[:, 0]
                > 0).numpy()

    return {out.frame_idx: upsample(out.pred_masks[:, 0])[0] for out in model.propagate_in_video_iterator(hf)}


# A decode that shares its forwards with other prompts or requests (the batched decoder) rounds differently from one
# prompt alone: docs/performance.md states the tolerances these check.
BATCHED_IOU, BATCHED_SCORE = 0.99, 1e-3


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def assert_batched_close(masks: list, scores: list, expected_masks: list, expected_scores: list) -> None:
    """The same instances, in order, with masks of IoU >= 0.99 and scores within 1e-3 of the expected ones."""
    assert len(masks) == len(expected_masks) and len(scores) == len(expected_scores), "not the same instances"
    for mask, expected in zip(masks, expected_masks):
        assert mask.shape == expected.shape and mask_iou(mask, expected) >= BATCHED_IOU
    for score, expected in zip(scores, expected_scores):
        assert abs(score - expected) <= BATCHED_SCORE
