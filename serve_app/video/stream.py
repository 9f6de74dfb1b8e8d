"""One live stream: frames arrive one at a time and each is tracked as it comes (transformers' streaming mode,
`model(inference_session=..., frame=...)`), with the state bounded however long the stream runs.

Plain class, no Ray: `deployments/stream.py` wraps it in one actor per stream. What HF's streaming sessions keep per
frame, and what `VideoStream._bound` drops once the model can no longer read it, is listed on `_bound`.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from serve_app.core.config import Config
from serve_app.core.errors import InvalidImage, PayloadTooLarge
from serve_app.image import postprocess as pp
from serve_app.image.engine import ImageEngine
from serve_app.image.geometry import validate_box_xyxy, validate_point
from serve_app.image.imageio import ImageLoader
from serve_app.video.session import batch_prompt_detection, memory_window, tracker_config
from serve_app.video.stream_prompt import Mode, StreamObject, StreamPrompt, check_prompt  # noqa: F401 - re-exported

FRAMES_KEPT = 1  # preprocessed frames held: the model reads only the frame it is on (the rest lives in its memories)


class FrameWindow(dict):
    """What the HF session holds as `processed_frames`: only the last FRAMES_KEPT frames, yet its length is the
    number of frames seen, as the model expects (it reads `num_frames` for how many object pointers to use)."""

    def __init__(self, kept: int = FRAMES_KEPT) -> None:
        super().__init__()
        self.kept, self.seen = kept, 0

    def __setitem__(self, index: int, value: torch.Tensor) -> None:
        super().__setitem__(index, value)
        self.seen = max(self.seen, index + 1)
        for old in [i for i in self if i <= index - self.kept]:
            del self[old]

    def __len__(self) -> int:
        return self.seen


@dataclass
class StreamCounters:
    frames: int = 0
    errors: int = 0
    compute_s: float = 0.0
    last_frame: float = field(default_factory=time.monotonic)


class VideoStream:
    """Frames in, each frame's objects out, in order. Memory does not grow with the frames (see `_bound`)."""

    def __init__(self, engine: ImageEngine, config: Config, prompt: StreamPrompt) -> None:
        check_prompt(prompt, config)
        self.engine, self.bundle, self.config, self.prompt = engine, engine.bundle, config, prompt
        self.mode: Mode = prompt.mode
        self.loader = ImageLoader(config.video_stream_max_frame_bytes, config.video_max_frame_pixels,
                                  config.min_image_side, fetcher=None)
        self.height: int | None = None
        self.width: int | None = None
        self.next_index = 0
        self.counters = StreamCounters()
        self._hf = None

    # ---- frames -----------------------------------------------------------------------------------------

    def decode(self, data: bytes) -> np.ndarray:
        """A client frame (PNG/JPEG/... bytes) as RGB, within the video knobs and the size of the first frame."""
        if len(data) > self.config.video_stream_max_frame_bytes:
            raise PayloadTooLarge(f"the frame is {len(data)} bytes; the limit is "
                                  f"{self.config.video_stream_max_frame_bytes} (SAM3_VIDEO_STREAM_MAX_FRAME_BYTES)")
        try:
            image = self.loader.decode(data)
        except PayloadTooLarge as exc:  # the loader names the image knob; a stream frame answers to the video ones
            raise PayloadTooLarge(exc.message.replace("SAM3_MAX_IMAGE_PIXELS", "SAM3_VIDEO_MAX_FRAME_PIXELS")) from None
        height, width = image.shape[:2]
        side = self.config.video_max_side
        if max(height, width) > side:
            raise PayloadTooLarge(f"the frame is {width}x{height}; the largest side accepted is {side} "
                                  "(SAM3_VIDEO_MAX_SIDE)")
        if self.height is not None and (height, width) != (self.height, self.width):
            raise InvalidImage(f"the frame is {width}x{height} but the stream's first frame was "
                               f"{self.width}x{self.height}: every frame of a stream must share one size")
        return image

    def push(self, data: bytes) -> dict:
        """Decode and track one frame; returns {frame_index, objects}. A bad frame raises and changes nothing."""
        image = self.decode(data)
        if self._hf is None and self.mode == "click":
            self.check_first_frame_prompt(*image.shape[:2])
        started = time.perf_counter()
        try:
            result = self._track(image)
        except Exception:
            self.counters.errors += 1
            raise
        self.counters.frames += 1
        self.counters.compute_s += time.perf_counter() - started
        self.counters.last_frame = time.monotonic()
        return result

    @torch.inference_mode()
    def _track(self, image: np.ndarray) -> dict:
        if self._hf is None:
            self.height, self.width = int(image.shape[0]), int(image.shape[1])
            self._hf = self._new_hf_session()
        index = self.next_index
        pixels = self.engine.preprocess([image])[0]
        if self.mode == "text":
            out = self.bundle.video(inference_session=self._hf, frame=pixels, frame_idx=index)
            result = self._text_frame(out)
        else:
            if index == 0:
                self._add_clicks(index)
            out = self.bundle.video_tracker(inference_session=self._hf, frame=pixels, frame_idx=index)
            result = self._tracker_frame(out)
        self.next_index = index + 1
        self._bound(index)
        return result

    def _new_hf_session(self):
        from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession
        from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

        cls = Sam3VideoInferenceSession if self.mode == "text" else Sam3TrackerVideoInferenceSession
        session = cls(
            video=None, video_height=self.height, video_width=self.width, inference_device=self.engine.device,
            inference_state_device=self.engine.device, video_storage_device=self.engine.device, dtype=self.engine.dtype,
        )
        session.processed_frames = FrameWindow()
        if self.mode == "text":
            self.bundle.video.max_num_objects = self.config.video_max_objects
            batch_prompt_detection(self.bundle.video)
            session.sam3_batch_prompts = True  # one detector forward per frame for all the texts
            for text in self.prompt.texts:
                prompt_id = session.add_prompt(text)
                if prompt_id not in session.prompt_input_ids:
                    ids, mask = self.bundle.tokenizer([text])
                    session.prompt_input_ids[prompt_id] = ids.to(self.engine.device)
                    session.prompt_attention_masks[prompt_id] = mask.to(self.engine.device)
        return session

    def _add_clicks(self, frame_index: int) -> None:
        """Every object's clicks and box on the first frame (checked against its size now that it is known)."""
        side = self.bundle.image_size
        sx, sy = side / self.width, side / self.height
        session = self._hf
        for obj in self.prompt.objects:
            points = [validate_point(x, y, self.width, self.height) for x, y in obj.points]
            coords = [[x * sx, y * sy] for x, y in points]
            labels = [int(v) for v in obj.labels]
            if obj.box is not None:  # a box is two corner points labelled 2 and 3, before any clicks
                x0, y0, x1, y1 = validate_box_xyxy(list(obj.box), self.width, self.height)
                coords, labels = [[x0 * sx, y0 * sy], [x1 * sx, y1 * sy], *coords], [2, 3, *labels]
            obj_idx = session.obj_id_to_idx(obj.object_id)
            session.add_point_inputs(obj_idx, frame_index, {
                "point_coords": torch.tensor(coords, dtype=torch.float32).reshape(1, 1, -1, 2),
                "point_labels": torch.tensor(labels, dtype=torch.int32).reshape(1, 1, -1),
            })
        session.obj_with_new_inputs = [obj.object_id for obj in self.prompt.objects]

    def check_first_frame_prompt(self, height: int, width: int) -> None:
        """Clicks and boxes must fall inside the first frame (raises InvalidPrompt)."""
        for obj in self.prompt.objects:
            for x, y in obj.points:
                validate_point(x, y, width, height)
            if obj.box is not None:
                validate_box_xyxy(list(obj.box), width, height)

    # ---- the bound --------------------------------------------------------------------------------------

    @property
    def _tracker_config(self):
        return tracker_config(self.bundle, self.mode)

    @property
    def memory_window(self) -> int:
        return memory_window(self._tracker_config)

    def _bound(self, frame_idx: int) -> None:
        """Drop what the model, having tracked `frame_idx`, will never read again. Per frame the HF sessions store:

        - `processed_frames[t]`: the preprocessed frame (3 x S x S): a FrameWindow keeps the current one only;
        - per object, `output_dict_per_obj[..]["non_cond_frame_outputs"][t]` (memories, object pointer, masks):
          a step at t reads t-1 .. t-(memory_window-1); older ones go; `high_res_masks` (image-size logits, only
          read to encode that frame's memory) go at once;
        - `cond_frame_outputs[t]`: prompted frames and, in text mode, every `recondition_every_nth_frame`-th frame.
          The step reads the memories of the `max_cond_frame_num` closest and the object pointer of every one of them,
          so they grow with the stream: the latest `max_cond_frame_num` are kept (plus those still inside the memory
          window), older ones go with their inputs (`point_inputs_per_obj`, `mask_inputs_per_obj`);
        - `frames_tracked_per_obj[..][t]`: read only to ask whether the current frame was tracked before: older go;
        - text mode: `obj_id_to_tracker_score_frame_wise[t]` and `suppressed_obj_ids[t]` (deep-copied on every frame:
          left alone they make every step slower), per object `unmatched_frame_inds` and per pair
          `overlap_pair_to_frame_inds` (appended to, read only by the hotstart removal that streaming mode skips):
          the current frame's entries are kept, the lists trimmed to the hotstart thresholds;
        - the vision-feature cache holds one frame (HF's own bound).
        """
        session = self._hf
        config = self._tracker_config
        oldest_read = frame_idx - self.memory_window + 1  # the oldest frame the next step may read
        keep_cond = max(1, int(config.max_cond_frame_num))
        for obj_idx, per_object in session.output_dict_per_obj.items():
            for outputs in (per_object["cond_frame_outputs"], per_object["non_cond_frame_outputs"]):
                stored = outputs.get(frame_idx)
                if stored is not None:
                    stored.pop("high_res_masks", None)
            non_cond = per_object["non_cond_frame_outputs"]
            for index in [i for i in non_cond if i < oldest_read]:
                del non_cond[index]
            cond = per_object["cond_frame_outputs"]
            if len(cond) > keep_cond:
                latest = set(sorted(cond)[-keep_cond:])
                for index in [i for i in cond if i not in latest and i < oldest_read]:
                    del cond[index]
                    session.point_inputs_per_obj.get(obj_idx, {}).pop(index, None)
                    session.mask_inputs_per_obj.get(obj_idx, {}).pop(index, None)
        for tracked in session.frames_tracked_per_obj.values():
            for index in [i for i in tracked if i < frame_idx]:
                del tracked[index]
        for inputs in (session.point_inputs_per_obj, session.mask_inputs_per_obj):
            for per_frame in inputs.values():  # inputs of frames that are neither the current one nor conditioning
                for index in [i for i in per_frame if i < frame_idx]:
                    if not any(index in session.output_dict_per_obj[o]["cond_frame_outputs"]
                               for o in session.output_dict_per_obj):
                        del per_frame[index]
        if self.mode == "text":
            video = self.bundle.video
            for per_frame in (session.obj_id_to_tracker_score_frame_wise, session.suppressed_obj_ids):
                for index in [i for i in per_frame if i < frame_idx]:
                    del per_frame[index]
            keep = max(int(video.hotstart_unmatch_thresh), int(video.hotstart_dup_thresh))
            for lists in (session.unmatched_frame_inds, session.overlap_pair_to_frame_inds):
                for indices in lists.values():
                    del indices[:-keep]

    def stored(self) -> dict:
        """How many per-frame entries the HF session holds now: flat over a long stream (the memory tests read it)."""
        session = self._hf
        if session is None:
            return {"processed_frames": 0, "outputs": 0, "cond_outputs": 0, "tracked": 0, "per_frame_metadata": 0,
                    "inputs": 0}
        outputs = sum(len(p["non_cond_frame_outputs"]) for p in session.output_dict_per_obj.values())
        cond = sum(len(p["cond_frame_outputs"]) for p in session.output_dict_per_obj.values())
        metadata = 0
        if self.mode == "text":
            metadata = (len(session.obj_id_to_tracker_score_frame_wise) + len(session.suppressed_obj_ids)
                        + sum(len(v) for v in session.unmatched_frame_inds.values())
                        + sum(len(v) for v in session.overlap_pair_to_frame_inds.values()))
        return {
            "processed_frames": len(dict.keys(session.processed_frames)),
            "outputs": outputs, "cond_outputs": cond,
            "tracked": sum(len(v) for v in session.frames_tracked_per_obj.values()),
            "per_frame_metadata": metadata,
            "inputs": sum(len(v) for v in session.point_inputs_per_obj.values())
            + sum(len(v) for v in session.mask_inputs_per_obj.values()),
        }

    def info(self) -> dict:
        c = self.counters
        return {
            "mode": self.mode, "texts": list(self.prompt.texts), "object_ids": [o.object_id for o in self.prompt.objects],
            "frames": c.frames, "errors": c.errors, "width": self.width, "height": self.height,
            "mean_compute_ms": round(1000 * c.compute_s / c.frames, 3) if c.frames else None,
            "idle_s": round(time.monotonic() - c.last_frame, 3), "stored": self.stored(),
        }

    def close(self) -> None:
        self._hf = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- outputs (the shape of a session's propagate lines) ---------------------------------------------

    def _objects(self, ids: list[int], logits: torch.Tensor, scores: list[float]) -> list[dict]:
        objects = []
        for rows, masks in pp.full_size_chunks(logits.float(), (self.height, self.width)):
            rles, boxes, areas = pp.encode_masks(masks)
            del masks
            for i, s, b, a, r in zip(ids[rows], scores[rows], boxes, areas, rles):
                objects.append({"object_id": int(i), "score": float(s), "box": list(b), "area": int(a), "mask": r})
        return objects

    def _text_frame(self, out) -> dict:
        hidden = set(out.suppressed_obj_ids or ()) | set(self._hf.hotstart_removed_obj_ids) | self._hf.removed_obj_ids
        ids = [i for i in sorted(out.obj_id_to_mask) if i not in hidden]
        if not ids:
            return {"frame_index": out.frame_idx, "objects": []}
        logits = torch.cat([out.obj_id_to_mask[i] for i in ids], dim=0)
        objects = self._objects(ids, logits, [float(out.obj_id_to_score[i]) for i in ids])
        return {"frame_index": out.frame_idx, "objects": [o for o in objects if o["area"] > 0]}

    def _tracker_frame(self, out) -> dict:
        ids = list(out.object_ids)
        scores = out.object_score_logits.float().sigmoid().flatten().tolist()
        return {"frame_index": out.frame_idx, "objects": self._objects(ids, out.pred_masks[:, 0], scores)}
