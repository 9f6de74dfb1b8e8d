"""Turns hostile client input (URL, data URI, base64, bytes) into a validated C-contiguous RGB uint8 image."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from serve_app.core.errors import InvalidImage, PayloadTooLarge

if TYPE_CHECKING:
    from serve_app.core.config import Config
    from serve_app.core.security import UrlFetcher

# Formats Pillow may parse. Deliberately short: no EPS (runs Ghostscript), no exotic decoders.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG also opens MPO (phone photos)

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_WHITESPACE = str.maketrans("", "", " \t\r\n\f\v")
_URLSAFE = str.maketrans("-_", "+/")
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_PIXELS_KNOB = "SAM3_MAX_IMAGE_PIXELS"
_SWAPS_SIDES = frozenset({5, 6, 7, 8})  # EXIF orientations that transpose the image
# Formats whose header (all Pillow reads on open) holds all the EXIF/XMP metadata decode() looks at; PNG only
# when no chunk follows the image data (see _png_tail_is_bare).
_HEADER_SIZED = frozenset({"JPEG", "MPO", "WEBP", "PNG"})
_BYTES_KNOB = "SAM3_MAX_IMAGE_BYTES"


def image_digest(data: bytes) -> str:
    """SHA-256 hex digest of the encoded image bytes (the embedding-cache key)."""
    return hashlib.sha256(data).hexdigest()


def _too_many_bytes(size: int, max_bytes: int, what: str = "image") -> PayloadTooLarge:
    return PayloadTooLarge(f"{what} is {size} bytes, more than the limit of {max_bytes} bytes ({_BYTES_KNOB})")


def _strip_data_uri(value: str) -> str:
    """The base64 part of a `data:[<media type>][;base64],<data>` URI."""
    header, comma, payload = value.partition(",")
    if not comma:
        raise InvalidImage("image data URI has no ',' separating the header from the data")
    if not header.lower().endswith(";base64"):
        raise InvalidImage("image data URI must be base64-encoded (data:image/png;base64,...)")
    return payload


def decode_base64_payload(value: str, max_bytes: int) -> bytes:
    """Decode standard or URL-safe base64 (padding optional, whitespace ignored) or a base64 data URI."""
    text = value.strip()
    if text[:5].lower() == "data:":
        text = _strip_data_uri(text)
    data = None
    if text and len(text) * 3 // 4 <= max_bytes + 2:
        try:  # canonical base64, what nearly every client sends: one C pass, no copies
            data = binascii.a2b_base64(text, strict_mode=True)
        except (binascii.Error, ValueError):
            data = None
    if data is None:
        data = _decode_lenient(text, max_bytes)
    if not data:
        raise InvalidImage("image is empty")
    if len(data) > max_bytes:
        raise _too_many_bytes(len(data), max_bytes)
    return data


def _decode_lenient(text: str, max_bytes: int) -> bytes:
    """Whitespace anywhere, the URL-safe alphabet and missing padding accepted."""
    text = text.translate(_WHITESPACE)
    if not text:
        raise InvalidImage("image is empty")
    estimate = len(text) * 3 // 4
    if estimate > max_bytes + 2:
        raise _too_many_bytes(estimate, max_bytes, "decoded image")
    text = text.rstrip("=").translate(_URLSAFE)
    if len(text) % 4 == 1:
        raise InvalidImage(f"image is not valid base64: {len(text)} characters cannot be base64 (truncated?)")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage(f"image is not valid base64: {exc}") from None


class ImageLoader:
    """Loads client images from URLs or base64 and decodes them with size, pixel and format checks.

    Alpha is dropped (not composited): RGBA, LA and transparent palette images keep their colour channels.
    16-bit greyscale is scaled to 8 bits; animated images yield their first frame; EXIF orientation is applied.
    """

    def __init__(self, max_bytes: int, max_pixels: int, min_side: int, fetcher: UrlFetcher) -> None:
        self.max_bytes = int(max_bytes)
        self.max_pixels = int(max_pixels)
        self.min_side = int(min_side)
        self.fetcher = fetcher
        # Pillow's own bomb check (error above 2x this) must never be stricter than ours; never lower it.
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < self.max_pixels:
            Image.MAX_IMAGE_PIXELS = self.max_pixels

    @classmethod
    def from_config(cls, config: Config, fetcher: UrlFetcher) -> ImageLoader:
        return cls(config.max_image_bytes, config.max_image_pixels, config.min_image_side, fetcher)

    async def load_bytes(self, source: str) -> bytes:
        """Encoded image bytes from an http(s) URL, a data URI or raw base64."""
        text = source.strip()
        if text[:5].lower() != "data:" and _SCHEME.match(text):
            data = await self.fetcher.fetch(text)  # rejects schemes other than http/https
        else:
            data = decode_base64_payload(text, self.max_bytes)
        if not data:
            raise InvalidImage("image is empty")
        if len(data) > self.max_bytes:
            raise _too_many_bytes(len(data), self.max_bytes)
        return data

    def decode(self, data: bytes) -> np.ndarray:
        """Decode encoded bytes into a C-contiguous (H, W, 3) uint8 RGB array; raises InvalidImage/PayloadTooLarge."""
        self._check_bytes(data)
        with self._decode_errors(), Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as img:
            self._check_size(img.size)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            return np.ascontiguousarray(np.array(_to_rgb(img), dtype=np.uint8))

    def probe(self, data: bytes) -> tuple[int, int] | None:
        """The (height, width) `decode` will return, from the header alone, after the checks `decode` makes there.

        None where the header cannot tell (formats whose metadata may follow the pixels): decode those instead.
        Damage past the header (a truncated file) is found only by `decode`.
        """
        self._check_bytes(data)
        with self._decode_errors(), Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as img:
            self._check_size(img.size)
            if img.format not in _HEADER_SIZED or (img.format == "PNG" and not _png_tail_is_bare(data)):
                return None
            width, height = img.size
            orientation = Image.Image.getexif(img).get(ExifTags.Base.Orientation, 1)  # what exif_transpose reads
            return (width, height) if orientation in _SWAPS_SIDES else (height, width)

    def _check_bytes(self, data: bytes) -> None:
        if not data:
            raise InvalidImage("image is empty")
        if len(data) > self.max_bytes:
            raise _too_many_bytes(len(data), self.max_bytes)

    @contextlib.contextmanager
    def _decode_errors(self) -> Iterator[None]:
        """Pillow's exceptions as the client errors they are."""
        try:
            yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            match = _BOMB_PIXELS.search(str(exc))
            size = f"{match.group(1)} pixels" if match else "too large to decode safely"
            raise self._too_many_pixels(size) from None
        except UnidentifiedImageError:
            formats = ", ".join(ACCEPTED_FORMATS)
            raise InvalidImage(f"could not decode image: not a supported image format (accepted: {formats})") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
            raise InvalidImage(f"could not decode image: the file is truncated or corrupt ({exc})") from None

    def _check_size(self, size: tuple[int, int]) -> None:
        """Runs on header data only, before any pixel buffer is allocated."""
        width, height = size
        if width * height > self.max_pixels:
            raise self._too_many_pixels(f"{width}x{height} ({width * height} pixels)")
        if width < self.min_side or height < self.min_side:
            raise InvalidImage(f"image is {width}x{height} pixels; the smallest accepted side is {self.min_side}")

    def _too_many_pixels(self, size: str) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"image is {size}, more than the limit of {self.max_pixels} pixels; downscale it or raise {_PIXELS_KNOB}"
        )


def _png_tail_is_bare(data: bytes) -> bool:
    """True when only image data and IEND follow the first IDAT chunk: Pillow's open then read every metadata chunk."""
    pos, seen_pixels = 8, False
    while pos + 8 <= len(data):
        kind = data[pos + 4 : pos + 8]
        if kind == b"IEND":
            return True
        if kind == b"IDAT":
            seen_pixels = True
        elif seen_pixels:
            return False
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
    return False


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB. Alpha is dropped; integer greyscale is scaled from 0..65535, float clipped to 0..255."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT:
        grey = np.asarray(img).astype(np.float32)
        scaled = np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")
    if img.mode == "F":
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # resolve the palette first so the transparent index keeps its colour
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise InvalidImage(f"could not decode image: colour mode {img.mode} is not supported ({exc})") from None
