"""One video session: text prompts track every instance (Sam3VideoModel), clicks/boxes track one object each
(Sam3TrackerVideoModel); propagation yields results frame by frame. Plain class: the Ray actor wraps it."""

from __future__ import annotations

import gc
import logging
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Literal

import numpy as np
import torch

from serve_app.core.errors import BadRequest, InvalidPrompt, NotFound
from serve_app.image import postprocess as pp
from serve_app.image.engine import ImageEngine
from serve_app.image.geometry import validate_box_xyxy, validate_point

Direction = Literal["forward", "backward", "both"]
FRAME_CACHE = 4  # preprocessed frames kept; the rest stay as uint8 on the CPU
PASS_EDGES = 8  # where the latest propagations started and stopped: their memory windows are kept (exact restarts)


@dataclass
class FrameResult:
    """Every tracked object on one frame: COCO RLE at the video's size, xyxy box, score.

    dropped_objects: new detections of a text prompt on this frame that were not tracked because the session
    already tracks max_objects (SAM3_VIDEO_MAX_OBJECTS); the highest-scoring ones are kept. Always 0 for clicks.
    """

    frame_index: int
    objects: list[dict] = field(default_factory=list)
    dropped_objects: int = 0


class LazyFrames:
    """What HF sessions read as `processed_frames`: preprocessed on access from raw uint8 frames, a few cached."""

    def __init__(self, frames: list[np.ndarray], engine: ImageEngine) -> None:
        self.frames, self.engine = frames, engine
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self.frames)

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and 0 <= index < len(self.frames)

    def __getitem__(self, index: int) -> torch.Tensor:
        if index not in self._cache:
            self._cache[index] = self.engine.preprocess([self.frames[index]])[0]
            while len(self._cache) > FRAME_CACHE:
                self._cache.popitem(last=False)
        self._cache.move_to_end(index)
        return self._cache[index]


@dataclass
class _Clicks:
    frame_index: int
    points: tuple
    labels: tuple
    box: tuple | None


class VideoSession:
    """Holds the frames and at most one HF inference session; a session tracks text concepts or clicked objects."""

    def __init__(
        self, engine: ImageEngine, frames: list[np.ndarray], fps: float, max_objects: int = 32, *, prune: bool = True
    ) -> None:
        if not frames:
            raise BadRequest("the video has no frames")
        self.engine, self.bundle = engine, engine.bundle
        self.frames, self.fps, self.max_objects = frames, fps, max_objects
        self.height, self.width = int(frames[0].shape[0]), int(frames[0].shape[1])
        self.mode: Literal["text", "click"] | None = None
        self.texts: list[str] = []
        self._clicks: dict[int, list[_Clicks]] = {}
        self._hf = None
        self._edges: deque[int] = deque(maxlen=PASS_EDGES)  # frames where recent propagations started or stopped
        self.prune = prune  # False keeps every frame's tracker outputs (transformers' own behaviour: the reference)

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    def _new_hf_session(self, kind: str):
        from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession
        from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

        cls = Sam3VideoInferenceSession if kind == "text" else Sam3TrackerVideoInferenceSession
        session = cls(
            video=None, video_height=self.height, video_width=self.width, inference_device=self.engine.device,
            inference_state_device=self.engine.device, video_storage_device="cpu", dtype=self.engine.dtype,
        )
        session.processed_frames = LazyFrames(self.frames, self.engine)
        if kind == "text":
            _count_dropped_detections(self.bundle.video)
            batch_prompt_detection(self.bundle.video)
            session.sam3_batch_prompts = True  # one detector forward per frame for all the text prompts
            session.sam3_dropped = {}  # frame index -> detections dropped at the object cap, until reported
        return session

    def _enter(self, mode: Literal["text", "click"]) -> None:
        if self.mode is None:
            if mode == "text":  # text prompts track what they find: at most max_objects of them, as clicks
                self.bundle.video.max_num_objects = self.max_objects
            self.mode, self._hf = mode, self._new_hf_session(mode)
        elif self.mode != mode:
            other = "text prompts" if self.mode == "text" else "clicks and boxes"
            raise BadRequest(f"this session tracks {other}; reset it or start another session to mix prompt kinds")

    def check_frame(self, frame_index: int) -> int:
        if not 0 <= frame_index < self.num_frames:
            raise InvalidPrompt(f"frame index {frame_index} is out of range: the video has {self.num_frames} frames")
        return frame_index

    # ---- prompts ----------------------------------------------------------------------------------------

    def add_text(self, text: str) -> int:
        """Track every instance of `text`; detections start arriving with `propagate`. Returns the prompt id."""
        if not text or not text.strip():
            raise InvalidPrompt("the text prompt is blank")
        self._enter("text")
        prompt_id = self._hf.add_prompt(text)
        if prompt_id not in self._hf.prompt_input_ids:
            ids, mask = self.bundle.tokenizer([text])
            self._hf.prompt_input_ids[prompt_id] = ids.to(self.engine.device)
            self._hf.prompt_attention_masks[prompt_id] = mask.to(self.engine.device)
            self.texts.append(text)
        return prompt_id

    def add_clicks(
        self, frame_index: int, object_id: int, points: list, labels: list, box: list | None = None
    ) -> FrameResult:
        """Start or refine one object on one frame; returns every object's mask on that frame."""
        self.check_frame(frame_index)
        if not points and box is None:
            raise InvalidPrompt("give points, a box, or both")
        if len(labels) != len(points):
            raise InvalidPrompt(f"{len(points)} points but {len(labels)} labels: give one label per point")
        if any(label not in (0, 1) for label in labels):
            raise InvalidPrompt("point labels must be 1 (on the object) or 0 (background)")
        pts = tuple(validate_point(x, y, self.width, self.height) for x, y in points)
        clipped = validate_box_xyxy(box, self.width, self.height) if box is not None else None
        if object_id not in self._clicks and len(self._clicks) >= self.max_objects:
            raise BadRequest(f"this session already tracks {self.max_objects} objects (SAM3_VIDEO_MAX_OBJECTS)")
        self._enter("click")
        entry = _Clicks(frame_index, pts, tuple(int(v) for v in labels), clipped)
        self._clicks.setdefault(object_id, []).append(entry)
        return self._apply_clicks(object_id, entry)

    @torch.inference_mode()
    def _apply_clicks(self, object_id: int, entry: _Clicks) -> FrameResult:
        side = self.bundle.image_size
        sx, sy = side / self.width, side / self.height
        coords = [[x * sx, y * sy] for x, y in entry.points]
        labels = list(entry.labels)
        if entry.box is not None:  # a box is two corner points labelled 2 and 3, before any clicks
            x0, y0, x1, y1 = entry.box
            coords, labels = [[x0 * sx, y0 * sy], [x1 * sx, y1 * sy], *coords], [2, 3, *labels]
        session = self._hf
        obj_idx = session.obj_id_to_idx(object_id)
        # A click on a frame this object was already tracked through is a correction: make that frame a
        # conditioning frame (as SAM2's add_all_frames_to_correct_as_cond does); otherwise the next
        # propagation recomputes it from memory and drops the clicks.
        session.frames_tracked_per_obj[obj_idx].pop(entry.frame_index, None)
        session.output_dict_per_obj[obj_idx]["non_cond_frame_outputs"].pop(entry.frame_index, None)
        point_coords = torch.tensor(coords, dtype=torch.float32).reshape(1, 1, -1, 2)
        point_labels = torch.tensor(labels, dtype=torch.int32).reshape(1, 1, -1)
        session.add_point_inputs(obj_idx, entry.frame_index, {"point_coords": point_coords, "point_labels": point_labels})
        session.remove_mask_inputs(obj_idx, entry.frame_index)
        session.obj_with_new_inputs = [object_id]
        out = self.bundle.video_tracker(inference_session=session, frame_idx=entry.frame_index)
        self._forget_high_res(entry.frame_index)
        return self._tracker_frame(out)

    def remove_object(self, object_id: int) -> None:
        """Stop tracking one object everywhere; other objects keep their prompts."""
        if self.mode == "click":
            if object_id not in self._clicks:
                raise NotFound(f"no object {object_id} in this session")
            del self._clicks[object_id]
            remaining, self._clicks = self._clicks, {}
            self._hf = self._new_hf_session("click")  # replay the other objects' clicks on a clean state
            for oid, entries in remaining.items():
                self._clicks[oid] = entries
                for entry in entries:
                    self._apply_clicks(oid, entry)
        elif self.mode == "text" and object_id in self._hf.obj_ids:
            self._hf.remove_object(object_id)
            self._hf.removed_obj_ids.add(object_id)
        else:
            raise NotFound(f"no object {object_id} in this session")

    def reset(self) -> None:
        """Forget every prompt and result; the frames stay."""
        self.mode, self._hf, self.texts, self._clicks = None, None, [], {}
        self._edges.clear()
        _free()

    def close(self) -> None:
        self.reset()
        closing = getattr(self.frames, "close", None)  # frames re-read from a container hold it open
        if closing is not None:
            closing()
        self.frames = []
        _free()

    # ---- propagation ------------------------------------------------------------------------------------

    def propagate(
        self, direction: Direction = "forward", start_frame: int | None = None, max_frames: int | None = None,
        *, one_pass: bool = False,
    ) -> Iterator[FrameResult]:
        """Yield every frame's objects as soon as the model produces them.

        one_pass=True: this propagation is the last use of the tracking state (a render; reset afterwards), so each
        frame's per-object outputs are dropped once the model can no longer read them (`memory_window` frames
        later): the results are the same, the state stops growing with the frames.
        """
        if self.mode is None:
            raise BadRequest("add a prompt before propagating")
        start = self.check_frame(start_frame if start_frame is not None else self._default_start())
        if max_frames is not None and max_frames < 1:
            raise InvalidPrompt("max_frames must be at least 1")
        if one_pass and direction != "forward":
            raise BadRequest("a one-pass propagation runs forward only")
        seen: set[int] = set()
        passes = {"forward": [False], "backward": [True], "both": [False, True]}[direction]
        for reverse in passes:
            for result in self._propagate_once(start, max_frames, reverse, one_pass):
                if result.frame_index not in seen:
                    seen.add(result.frame_index)
                    yield result

    @property
    def _tracker_config(self):
        return tracker_config(self.bundle, self.mode)

    @property
    def memory_window(self) -> int:
        return memory_window(self._tracker_config)

    def _default_start(self) -> int:
        if self.mode == "click":
            return min(e.frame_index for entries in self._clicks.values() for e in entries)
        return 0

    def _propagate_once(
        self, start: int, max_frames: int | None, reverse: bool, one_pass: bool = False
    ) -> Iterator[FrameResult]:
        with torch.inference_mode():
            if self.mode == "text":
                if reverse and start == 0:
                    return
                iterator = self.bundle.video.propagate_in_video_iterator(
                    self._hf, start_frame_idx=start, max_frame_num_to_track=max_frames, reverse=reverse
                )
                frame = self._text_frame
            else:
                iterator = self.bundle.video_tracker.propagate_in_video_iterator(
                    self._hf, start_frame_idx=start, max_frame_num_to_track=max_frames, reverse=reverse
                )
                frame = self._tracker_frame
            self._edges.append(start)
            last = start
            try:
                for out in iterator:
                    last = out.frame_idx
                    self._forget_high_res(out.frame_idx)
                    if one_pass:
                        self._forget_behind(out.frame_idx)
                    elif self.prune:
                        self._forget_outside_windows(out.frame_idx, reverse)
                    yield frame(out)
            finally:  # finished, or abandoned by its reader: a later pass may start where this one stopped
                self._edges.append(last)
                if self.prune and self._hf is not None:
                    self._forget_outside_windows(last, reverse)
                    if self.mode == "text":
                        self._forget_lost_objects()

    def _forget_high_res(self, frame_idx: int) -> None:
        """Drop the image-size mask logits transformers keeps in every object's output of a tracked frame.

        They feed that frame's memory encoding and are never read again, yet they are the largest entry per
        object and frame (image_size^2 float32 against 288^2 + 2 x 64 x 72^2 for the rest on facebook/sam3).
        """
        for per_object in self._hf.output_dict_per_obj.values():
            for outputs in (per_object["cond_frame_outputs"], per_object["non_cond_frame_outputs"]):
                stored = outputs.get(frame_idx)
                if stored is not None:
                    stored.pop("high_res_masks", None)

    def _forget_outside_windows(self, frame_idx: int, reverse: bool) -> None:
        """Bound an interactive session's tracker state: drop the non-conditioning outputs no later step reads.

        A step at frame t reads, of each object, the conditioning frames (all kept) and the non-conditioning outputs
        of the `memory_window` frames before t in its direction (t-1 .. t-16 forward, t+1 .. t+16 backward). The
        outputs behind the frame now tracked by more than the window are dropped, except those within the window of
        a frame where one of the latest PASS_EDGES propagations started or stopped (a pass that resumes there, a
        backward pass after a forward one from the same frame, reads them) and, for clicked objects, of their
        clicked frames. Propagations started there are exact; one started elsewhere reads what is held (docs).
        """
        window = self.memory_window
        edges = set(self._edges)
        edges.add(frame_idx)
        for per_object in self._hf.output_dict_per_obj.values():
            outputs = per_object["non_cond_frame_outputs"]
            if len(outputs) <= window:
                continue
            anchors = edges | set(per_object["cond_frame_outputs"]) if self.mode == "click" else edges
            for index in [i for i in outputs if (i > frame_idx + window if reverse else i < frame_idx - window)]:
                if all(abs(index - a) > window for a in anchors):
                    del outputs[index]

    def _forget_lost_objects(self) -> None:
        """Drop the detection bookkeeping of objects the tracker no longer holds (text prompts, after each pass).

        transformers keeps, per object id ever detected, its score, first frame, unmatched frames, keep-alive count,
        overlap pairs, per-frame tracker scores and removal marks, and deep-copies all of it on every frame. Ids
        are never reused (max_obj_id only grows) and no step reads an id that is not in obj_ids, so a session that
        is prompted and propagated again and again kept growing (+32 ids a round in the soak's loop: 480 -> 1,440
        entries in each map over 30 rounds, +15 MiB of RSS) and got slower by the round.
        """
        hf = self._hf
        held = set(hf.obj_ids)
        for mapping in (hf.obj_id_to_score, hf.obj_first_frame_idx, hf.unmatched_frame_inds, hf.trk_keep_alive,
                        hf.obj_id_to_last_occluded):
            for obj_id in [i for i in mapping if i not in held]:
                del mapping[obj_id]
        for per_frame in hf.obj_id_to_tracker_score_frame_wise.values():
            for obj_id in [i for i in per_frame if i not in held]:
                del per_frame[obj_id]
        for pair in [p for p in hf.overlap_pair_to_frame_inds if not set(p) <= held]:
            del hf.overlap_pair_to_frame_inds[pair]
        hf.removed_obj_ids.intersection_update(held)
        hf.hotstart_removed_obj_ids.intersection_update(held)

    def _forget_behind(self, frame_idx: int) -> None:
        """Drop what a forward pass that has reached `frame_idx` will never read again (exact for one pass).

        A forward step at frame t reads, of each object: non-conditioning outputs of t-1 .. t-(num_maskmem-1)
        (memories) and t-1 .. t-(max_object_pointers_in_encoder-1) (pointers); the memories of the
        max_cond_frame_num conditioning frames closest to t (going forward: the latest ones) and of those inside the
        memory window; the object pointer of every conditioning frame. The rest is dropped as t moves on.
        """
        config = self._tracker_config
        gone = frame_idx - self.memory_window
        latest_cond = int(config.max_cond_frame_num)
        for per_object in self._hf.output_dict_per_obj.values():
            if gone >= 0:
                per_object["non_cond_frame_outputs"].pop(gone, None)
            cond = per_object["cond_frame_outputs"]
            if latest_cond < 0 or len(cond) <= latest_cond:
                continue
            kept = set(sorted(cond)[-latest_cond:])
            for index, stored in cond.items():
                if index not in kept and index < frame_idx - int(config.num_maskmem):
                    for key in ("maskmem_features", "maskmem_pos_enc", "pred_masks"):
                        stored.pop(key, None)

    # ---- outputs ----------------------------------------------------------------------------------------

    def _objects(self, ids: list[int], logits: torch.Tensor, scores: list[float]) -> list[dict]:
        """Each object's mask at the video's size, RLE-encoded a chunk of objects at a time (never all at once)."""
        if not ids:
            return []
        objects = []
        for rows, masks in pp.full_size_chunks(logits.float(), (self.height, self.width)):
            rles, boxes, areas = pp.encode_masks(masks)
            del masks
            for i, s, b, a, r in zip(ids[rows], scores[rows], boxes, areas, rles):
                objects.append({"object_id": int(i), "score": float(s), "box": list(b), "area": int(a), "rle": r})
        return objects

    def _text_frame(self, out) -> FrameResult:
        dropped = self._hf.sam3_dropped
        count = dropped.pop(out.frame_idx, 0)
        for index in [i for i in dropped if abs(i - out.frame_idx) > self.memory_window]:
            del dropped[index]  # planned but never yielded (a pass stopped early): not reported, not kept
        hidden = set(out.suppressed_obj_ids or ()) | set(self._hf.hotstart_removed_obj_ids) | self._hf.removed_obj_ids
        ids = [i for i in sorted(out.obj_id_to_mask) if i not in hidden]
        if not ids:
            return FrameResult(out.frame_idx, dropped_objects=count)
        logits = torch.cat([out.obj_id_to_mask[i] for i in ids], dim=0)
        objects = self._objects(ids, logits, [float(out.obj_id_to_score[i]) for i in ids])
        prompts, of = self._hf.prompts, self._hf.obj_id_to_prompt_id
        for o in objects:  # which of the session's text prompts found it (several are tracked together)
            o["text"] = prompts.get(of.get(o["object_id"]))
        return FrameResult(out.frame_idx, [o for o in objects if o["area"] > 0], dropped_objects=count)

    def _tracker_frame(self, out) -> FrameResult:
        ids = list(out.object_ids)
        scores = out.object_score_logits.float().sigmoid().flatten().tolist()
        return FrameResult(out.frame_idx, self._objects(ids, out.pred_masks[:, 0], scores))


def tracker_config(bundle, mode: str | None):
    """The config of the tracker that runs a propagation or stream (text prompts: the video model's own)."""
    return (bundle.video.tracker_model if mode == "text" else bundle.video_tracker).config


def memory_window(config) -> int:
    """How many frames back a forward step reads other frames' outputs: memories and object pointers."""
    return max(int(config.num_maskmem), int(config.max_object_pointers_in_encoder))


class _CapWarning(logging.Filter):
    """transformers warns on every frame a text prompt finds more objects than the cap; we report it per frame."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("hitting self.max_num_objects")


def _count_dropped_detections(model) -> None:
    """Record, per frame, how many new detections Sam3VideoModel left untracked at max_num_objects.

    transformers computes the number in its planning step (num_obj_dropped_due_to_limit) but does not return it: the
    model's planning method is wrapped, once per model, to copy it into the inference session being tracked.
    """
    if getattr(model, "_sam3_counts_dropped", False):
        return
    planning = model.run_tracker_update_planning_phase

    def counted(*args, **kwargs):
        plan, metadata = planning(*args, **kwargs)
        session, frame_idx = kwargs.get("inference_session"), kwargs.get("frame_idx")
        dropped = getattr(session, "sam3_dropped", None)
        if dropped is not None and frame_idx is not None:
            dropped[int(frame_idx)] = int(plan.get("num_obj_dropped_due_to_limit", 0))
        return plan, metadata

    model.run_tracker_update_planning_phase = counted
    model._sam3_counts_dropped = True
    logging.getLogger(type(model).__module__).addFilter(_CapWarning())


def batch_prompt_detection(model) -> None:
    """Run the detector once per frame for all of a session's text prompts, not once per prompt.

    Sam3VideoModel.run_detection loops over the prompts, each a full DETR encoder + decoder + mask head over the
    same frame's features. Sessions that set `sam3_batch_prompts` on their inference session get one forward with
    the prompts' text features stacked (each prompt's own, encoded once and cached as transformers caches them) and
    the frame's vision features shared, then transformers' own per-prompt steps (presence, NMS, threshold) on each
    row. Other inference sessions (the parity tests' references) keep transformers' loop. Wrapped once per model.
    """
    if getattr(model, "_sam3_batches_prompts", False):
        return
    from transformers.models.sam3_video.modeling_sam3_video import nms_masks

    single = model.run_detection

    def batched(inference_session, vision_embeds):
        prompt_ids = list(inference_session.prompts.keys())
        if len(prompt_ids) < 2 or not getattr(inference_session, "sam3_batch_prompts", False):
            return single(inference_session=inference_session, vision_embeds=vision_embeds)
        detector = model.detector_model
        for prompt_id in prompt_ids:
            if prompt_id not in inference_session.prompt_embeddings:
                inference_session.prompt_embeddings[prompt_id] = detector.get_text_features(
                    input_ids=inference_session.prompt_input_ids[prompt_id],
                    attention_mask=inference_session.prompt_attention_masks[prompt_id],
                    return_dict=True,
                )
        count = len(prompt_ids)
        text = torch.cat([inference_session.prompt_embeddings[p].pooler_output for p in prompt_ids])
        mask = torch.cat([inference_session.prompt_attention_masks[p] for p in prompt_ids])
        shared = SimpleNamespace(
            fpn_hidden_states=tuple(f.expand(count, *f.shape[1:]) for f in vision_embeds.fpn_hidden_states),
            fpn_position_encoding=tuple(f.expand(count, *f.shape[1:]) for f in vision_embeds.fpn_position_encoding),
            hidden_states=None, attentions=None,
        )
        out = detector(vision_embeds=shared, text_embeds=SimpleNamespace(pooler_output=text), attention_mask=mask)
        detections = {}
        for row, prompt_id in enumerate(prompt_ids):  # transformers' per-prompt steps, on this prompt's row
            probs = out.pred_logits[row : row + 1].sigmoid() * out.presence_logits[row : row + 1].sigmoid()
            masks, boxes = out.pred_masks[row : row + 1], out.pred_boxes[row : row + 1]
            if model.det_nms_thresh > 0.0:
                keep = nms_masks(pred_probs=probs[0], pred_masks=masks[0], prob_threshold=model.score_threshold_detection,
                                 iou_threshold=model.det_nms_thresh)
                probs[0][~keep] = 0.0
            index = torch.where(probs > model.score_threshold_detection)
            detections[prompt_id] = {"bbox": boxes[index[0], index[1]], "mask": masks[index[0], index[1]],
                                     "scores": probs[index[0], index[1]]}
        return detections

    model.run_detection = batched
    model._sam3_batches_prompts = True


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
