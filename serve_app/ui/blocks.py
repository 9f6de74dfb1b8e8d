"""The web UI's Gradio app: Image, Automatic masks and Video tabs, and the HF Space's API (`/predict`,
`/sam2_compatible`), every one calling the same SegmentService and video backend as the HTTP APIs."""

# No `from __future__ import annotations`: Gradio reads the API functions' type hints at run time.

import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gradio as gr

from serve_app.core.errors import Sam3Error
from serve_app.image.service import SegmentService
from serve_app.ui import handlers
from serve_app.ui.handlers import ImageAnswer
from serve_app.video.backend import get_video_backend

logger = logging.getLogger(__name__)

TITLE = "SAM3: segment anything with text, clicks and boxes"
FILES_TTL_S = 3600.0  # downloads older than this are deleted when new ones are written
CLICK_MODES = ["object click", "background click", "box corner"]
AUTH_ON = ("**API keys are on for this server**: enter yours in the key field; every request is made with it "
           "(API clients send `Authorization: Bearer <key>`).")


@contextmanager
def shown_errors() -> Iterator[None]:
    """A service error as Gradio's error toast (and gradio_client's AppError), with the same message as the APIs."""
    try:
        yield
    except Sam3Error as exc:
        raise gr.Error(exc.message) from None
    except gr.Error:
        raise
    except Exception:
        logger.exception("UI request failed")
        raise gr.Error("internal server error") from None


def files_dir() -> Path:
    """A fresh folder for one answer's downloads; folders older than FILES_TTL_S go."""
    root = Path(tempfile.gettempdir()) / "sam3-ui"
    root.mkdir(exist_ok=True)
    for old in root.iterdir():
        if time.time() - old.stat().st_mtime > FILES_TTL_S:
            shutil.rmtree(old, ignore_errors=True)
    return root / uuid.uuid4().hex


def shown(answer: ImageAnswer) -> tuple:
    """The overlay (each instance a labelled mask), the instance table, the downloads and a one-line summary."""
    annotations = [(f.mask().astype(float), f"{f.label} ({f.score:.2f})") for f in answer.found]
    files = handlers.write_downloads(answer, files_dir()) if answer.found else None
    return (answer.pixels, annotations), answer.summary(), files, f"{len(answer.found)} instance(s) found"


def build(service: SegmentService) -> gr.Blocks:
    """The whole UI over one service (the video backend is looked up per call: it may be absent)."""
    with gr.Blocks(title="SAM3", delete_cache=(3600, 3600)) as blocks:
        gr.Markdown(f"# {TITLE}")
        key = gr.Textbox(label="API key", type="password", visible=service.auth.enabled, elem_id="api-key")
        if service.auth.enabled:
            gr.Markdown(AUTH_ON)
        with gr.Tab("Image"):
            _image_tab(service, key)
        with gr.Tab("Automatic masks"):
            _auto_tab(service, key)
        with gr.Tab("Video"):
            _video_tab(service, key)
        _space_api(service)
    blocks.queue(default_concurrency_limit=8)
    return blocks


def _click_inputs(label: str) -> tuple:
    mode = gr.Radio(CLICK_MODES, value=CLICK_MODES[0], label=label)
    clicks = gr.Textbox("[]", label="Clicks [[x, y, 1 = object / 0 = background], ...]")
    boxes = gr.Textbox("[]", label="Boxes [[x0, y0, x1, y1], ...] (two clicks in box-corner mode)")
    return mode, clicks, boxes, gr.State(None)


def _on_click(mode: str, clicks: str, boxes: str, corner, evt: gr.SelectData):
    with shown_errors():
        return handlers.add_click(mode, evt.index[0], evt.index[1], clicks, boxes, corner)


def _results() -> list:
    summary = gr.Markdown(elem_id="summary")
    overlay = gr.AnnotatedImage(label="Overlay: each instance in its colour", elem_id="overlay")
    table = gr.JSON(label="Instances: label, score, box [x0, y0, x1, y1], area", max_height=300)
    files = gr.File(label="Download the masks: PNGs (zip) and COCO RLE (json)", file_count="multiple")
    return [overlay, table, files, summary]


def _image_tab(service: SegmentService, key: gr.Textbox) -> None:
    with gr.Row():
        with gr.Column():
            image = gr.Image(type="filepath", image_mode=None, label="Image: click to add points or box corners",
                             elem_id="image-in")
            text = gr.Textbox(label="Text prompts, separated by commas", placeholder="kitten, toy", elem_id="prompt")
            mode, clicks, boxes, corner = _click_inputs("A click on the image adds")
            threshold = gr.Slider(0.0, 1.0, 0.5, step=0.01, label="Score threshold (text prompts)")
            with gr.Row():
                clear = gr.Button("Clear clicks and boxes")
                run = gr.Button("Segment", variant="primary", elem_id="segment")
        with gr.Column():
            outputs = _results()

    async def segment(key_value, path, text_value, clicks_value, boxes_value, threshold_value, request: gr.Request):
        with shown_errors():
            who = handlers.tenant(service, key_value, dict(request.headers))
            answer = await handlers.segment_image(
                service, who, path, text_value, clicks_value, boxes_value, threshold_value
            )
            return shown(answer)

    image.select(_on_click, [mode, clicks, boxes, corner], [clicks, boxes, corner], api_visibility="private")
    for event in (clear.click, image.upload, image.clear):
        event(lambda: ("[]", "[]", None), None, [clicks, boxes, corner], api_visibility="private")
    run.click(segment, [key, image, text, clicks, boxes, threshold], outputs, api_visibility="undocumented")


def _auto_tab(service: SegmentService, key: gr.Textbox) -> None:
    with gr.Row():
        with gr.Column():
            image = gr.Image(type="filepath", image_mode=None, label="Image", elem_id="auto-in")
            per_side = gr.Slider(1, 64, 16, step=1, label="Points per side (the click grid is this squared)")
            iou = gr.Slider(0.5, 1.0, 0.88, step=0.01, label="Minimum predicted IoU")
            max_masks = gr.Slider(0, 100, 0, step=1, label="Most masks (0 = the server's cap)")
            run = gr.Button("Find every object", variant="primary", elem_id="auto-run")
        with gr.Column():
            outputs = _results()

    async def automatic(key_value, path, per_side_value, iou_value, max_value, request: gr.Request):
        with shown_errors():
            who = handlers.tenant(service, key_value, dict(request.headers))
            return shown(await handlers.automatic_masks(service, who, path, per_side_value, iou_value, max_value))

    run.click(automatic, [key, image, per_side, iou, max_masks], outputs, api_visibility="undocumented")


def _video_tab(service: SegmentService, key: gr.Textbox) -> None:
    with gr.Row():
        with gr.Column():
            video = gr.Video(label="Video (mp4, webm, mov)", sources=["upload"], elem_id="video-in")
            frame = gr.Image(label="First frame: click on the object to track it", interactive=False, type="numpy")
            text = gr.Textbox(label="Text prompt: tracks every instance (leave empty to track your clicks)")
            clicks = gr.Textbox("[]", label="Clicks on the first frame [[x, y, 1 / 0], ...]")
            apply_mask = gr.Checkbox(True, label="Fill the masks (else outlines only)")
            run = gr.Button("Track", variant="primary", elem_id="video-run")
        with gr.Column():
            rendered = gr.Video(label="Tracked", elem_id="video-out")

    def show_first(path):
        with shown_errors():
            return (handlers.first_frame(path, service.config) if path else None), "[]"

    def on_click(clicks_value: str, evt: gr.SelectData):
        with shown_errors():
            return handlers.add_click(CLICK_MODES[0], evt.index[0], evt.index[1], clicks_value, "[]", None)[0]

    async def track(key_value, path, text_value, clicks_value, fill, request: gr.Request, progress=gr.Progress()):
        with shown_errors():
            who = handlers.tenant(service, key_value, dict(request.headers))
            if not path:
                raise gr.Error("upload a video first")
            mp4 = await handlers.track_video(
                get_video_backend(), service.config, who, path, text_value, handlers.parse_clicks(clicks_value), fill,
                lambda done, total: progress((done, total), desc="tracking", unit="frames"),
            )
            return handlers.mp4_file(mp4, files_dir())

    video.change(show_first, video, [frame, clicks], api_visibility="private")
    frame.select(on_click, clicks, clicks, api_visibility="private")
    run.click(track, [key, video, text, clicks, apply_mask], rendered, api_visibility="undocumented")


def _space_api(service: SegmentService) -> None:
    """The SAM3 Space's two functions, by the same names, for gradio_client."""

    async def predict(image: str, text: str, threshold: float = 0.5, request: gr.Request = None) -> dict:
        """The Space's simple API: image (base64 or a data URI), a text prompt, a threshold -> its structured result."""
        with shown_errors():
            who = handlers.tenant(service, None, dict(request.headers) if request else {})
            return await handlers.api_predict(service, who, image, text, threshold)

    async def sam2_compatible(inputs: dict, request: gr.Request = None) -> dict:
        """The Space's SAM2/SAM3-compatible API: the `inputs` object of POST /api/sam2_compatible -> its result."""
        with shown_errors():
            who = handlers.tenant(service, None, dict(request.headers) if request else {})
            return await handlers.api_sam2_compatible(service, who, inputs)

    gr.api(predict, api_name="predict")
    gr.api(sam2_compatible, api_name="sam2_compatible")
