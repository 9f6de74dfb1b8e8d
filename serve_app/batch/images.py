"""The image stages, plain callables Ray Data maps over batches: read and decode, segment, polygons."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from serve_app.batch.inputs import filesystem
from serve_app.batch.spec import Thresholds, canonical, category_name, internal_request
from serve_app.core.config import Config
from serve_app.core.errors import PayloadTooLarge, Sam3Error
from serve_app.core.types import SegmentResult
from serve_app.image import codecs
from serve_app.image.engine import ImageEngine
from serve_app.image.imageio import ImageLoader
from serve_app.image.models import load_bundle
from serve_app.image.prompts import validate_prompts

logger = logging.getLogger(__name__)

INSTANCE = pa.struct([
    ("prompt_index", pa.int32()), ("category", pa.string()), ("score", pa.float64()),
    ("box", pa.list_(pa.float64())),  # xyxy pixels, as /v1 returns it
    ("area", pa.int64()), ("counts", pa.string()),  # COCO compressed RLE counts; size is [height, width]
    ("polygons", pa.string()),  # JSON [{exterior, holes}] as /v1 `output=polygon`; null unless asked for
])
IMAGE_ROW = pa.schema([
    ("index", pa.int64()), ("path", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("error_code", pa.string()), ("error", pa.string()), ("instances", pa.list_(INSTANCE)),
])
NO_PIXELS = np.zeros((0, 0, 3), dtype=np.uint8)


def error_fields(exc: BaseException) -> tuple[str, str]:
    """(code, message) recorded for an item that failed: the service's own code, or the exception's type."""
    if isinstance(exc, Sam3Error):
        return exc.code, exc.message
    if isinstance(exc, (FileNotFoundError, PermissionError, OSError)):
        return "unreadable", f"could not read the file: {exc}"
    return "internal_error", f"{type(exc).__name__}: {exc}"


def read_bytes(location: str, max_bytes: int, knob: str) -> bytes:
    """A file's bytes, refusing one over `max_bytes` from its listed size before reading it."""
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{location} is not a file")
    if info.size is not None and info.size > max_bytes:
        raise PayloadTooLarge(f"the file is {info.size} bytes, more than the limit of {max_bytes} bytes ({knob})")
    with fs.open_input_stream(path) as stream:
        return stream.read()


def make_engine(config: Config, video_model=None) -> ImageEngine:
    """The online server's engine, on `video_model` when the driver built it (built-in models), else loaded here."""
    return ImageEngine(load_bundle(config, video_model), prompt_batch=config.decoder_batches()[1],
                       visual_batch=config.decoder_batches()[2])


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


class ImageReader:
    """Stage 1 (CPU tasks): each image's bytes, decoded within the server's limits; a failure is the row's error.

    Between stages "" means none (no error, the job's prompts): Ray Data turns all-null columns into NaN."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.loader = ImageLoader(config.max_image_bytes, config.max_image_pixels, config.min_image_side, None)

    def decode(self, location: str) -> np.ndarray:
        return self.loader.decode(read_bytes(location, self.config.max_image_bytes, "SAM3_MAX_IMAGE_BYTES"))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels, codes, errors = [], [], []
        for location in batch["path"]:
            try:
                image, code, error = self.decode(str(location)), "", ""
            except Exception as exc:  # noqa: BLE001 - one bad file must not end the job
                image, (code, error) = NO_PIXELS, error_fields(exc)
            pixels.append(image)
            codes.append(code)
            errors.append(error)
        return {
            "index": batch["index"], "path": batch["path"], "prompts": batch["prompts"],
            "pixels": _objects(pixels), "error_code": np.array(codes, dtype=object),
            "error": np.array(errors, dtype=object),
        }


def error_row(index: int, path: str, code: str, message: str, size: tuple[int, int] = (0, 0)) -> dict:
    return {"index": int(index), "path": path, "width": size[1], "height": size[0], "error_code": code,
            "error": message, "instances": []}


def result_row(index: int, path: str, result: SegmentResult, names: list[str]) -> dict:
    """One image's instances, prompt by prompt, each as /v1 returns it (score, xyxy box, area, RLE counts)."""
    instances = [
        {"prompt_index": r.prompt_index, "category": names[r.prompt_index], "score": i.score, "box": list(i.box),
         "area": i.area, "counts": i.rle["counts"], "polygons": None}
        for r in result.prompts for i in r.instances
    ]
    return {"index": int(index), "path": path, "width": result.width, "height": result.height, "error_code": None,
            "error": None, "instances": instances}


class ImageSegmenter:
    """Stage 2 (the actor pool): one backbone forward per batch, then every image's prompts, as /v1 decodes them."""

    def __init__(
        self, config: Config, prompts: list[dict] | None, thresholds: Thresholds, categories: list[str],
        torch_threads: int | None = None, engine: ImageEngine | None = None, video_model=None,
    ) -> None:
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.config, self.thresholds = config, thresholds
        self.engine = engine or make_engine(config, video_model)
        self.global_prompts = canonical(prompts) if prompts else None
        self.global_names = categories

    def _prepare(self, prompts_json: str | None, pixels: np.ndarray) -> tuple[list, object, list[str]]:
        """Internal prompts checked against this image, its params and its prompts' category names."""
        text = prompts_json or self.global_prompts
        prompts, params = internal_request(text, self.thresholds, self.config)
        prompts = validate_prompts(prompts, (int(pixels.shape[0]), int(pixels.shape[1])), self.config)
        names = self.global_names if not prompts_json else [category_name(p, i) for i, p in enumerate(json.loads(text))]
        return prompts, params, names

    def _encode(self, images: list[np.ndarray]) -> list[object]:
        """Embeddings, one forward for the batch; if that fails, image by image (an exception stands for a failure)."""
        if not images:
            return []
        try:
            return self.engine.encode(images)
        except Exception:
            logger.exception("batched encode of %d images failed; encoding them one by one", len(images))
        out: list[object] = []
        for image in images:
            try:
                out.extend(self.engine.encode([image]))
            except Exception as exc:  # noqa: BLE001
                out.append(exc)
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows, pending = [], []
        for i, index in enumerate(batch["index"]):
            path, pixels = str(batch["path"][i]), batch["pixels"][i]
            if batch["error_code"][i]:
                rows.append(error_row(index, path, batch["error_code"][i], batch["error"][i]))
                continue
            size = (int(pixels.shape[0]), int(pixels.shape[1]))
            try:
                pending.append((index, path, pixels, *self._prepare(batch["prompts"][i], pixels)))
            except Exception as exc:  # noqa: BLE001
                rows.append(error_row(index, path, *error_fields(exc), size))
        embeddings = self._encode([item[2] for item in pending])
        for (index, path, pixels, prompts, params, names), embedding in zip(pending, embeddings):
            size = (int(pixels.shape[0]), int(pixels.shape[1]))
            try:
                if isinstance(embedding, BaseException):
                    raise embedding
                rows.append(result_row(index, path, self.engine.decode(embedding, prompts, params, size), names))
            except Exception as exc:  # noqa: BLE001
                logger.warning("image %s failed: %s", path, exc)
                rows.append(error_row(index, path, *error_fields(exc), size))
        return pa.Table.from_pylist(sorted(rows, key=lambda row: row["index"]), schema=IMAGE_ROW)


class PolygonStage:
    """Stage 3 (CPU tasks, with --polygons): each RLE mask also as polygons with holes, as /v1 `output=polygon`."""

    def __init__(self, epsilon: float | None = None) -> None:
        self.epsilon = epsilon

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for row in rows:
            size = [row["height"], row["width"]]
            for inst in row["instances"]:
                mask = codecs.rle_decode({"size": size, "counts": inst["counts"]})
                inst["polygons"] = json.dumps(codecs.mask_to_polygons_with_holes(mask, simplify_epsilon=self.epsilon))
        return pa.Table.from_pylist(rows, schema=IMAGE_ROW)
