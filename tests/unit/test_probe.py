"""The ingress' fast path: the header tells the size `decode` will return, canonical base64 decodes as before."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from serve_app.core.errors import InvalidImage, PayloadTooLarge
from serve_app.image.imageio import ImageLoader, decode_base64_payload
from serve_app.image.service import EncoderInput


@pytest.fixture
def loader() -> ImageLoader:
    return ImageLoader(max_bytes=2_000_000, max_pixels=4_000_000, min_side=2, fetcher=None)


def picture(width: int = 40, height: int = 30, mode: str = "RGB") -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 6, y * 8, (x + y) * 3], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def oriented(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


CASES = [
    ("PNG", "RGB", {}), ("PNG", "RGBA", {}), ("PNG", "P", {}), ("PNG", "I;16", {}), ("PNG", "L", {}),
    ("JPEG", "RGB", {}), ("JPEG", "L", {}), ("JPEG", "CMYK", {}), ("WEBP", "RGB", {}), ("WEBP", "RGBA", {}),
    ("GIF", "P", {}), ("BMP", "RGB", {}), ("TIFF", "RGB", {}),
    *[(fmt, "RGB", {"exif": oriented(o)}) for fmt in ("JPEG", "PNG", "WEBP", "TIFF") for o in range(1, 9)],
]


@pytest.mark.parametrize(("fmt", "mode", "params"), CASES, ids=[f"{f}-{m}-{sorted(p)}-{i}" for i, (f, m, p) in
                                                               enumerate(CASES)])
def test_probe_agrees_with_decode(loader: ImageLoader, fmt: str, mode: str, params: dict) -> None:
    data = encode(picture(mode=mode), fmt, **params)
    size = loader.probe(data)
    decoded = loader.decode(data)
    assert size is None or size == decoded.shape[:2]
    if fmt in ("JPEG", "PNG", "WEBP"):
        assert size is not None, "the common formats must not need a decode on the ingress"


def test_probe_reads_a_rotating_jpeg_orientation(loader: ImageLoader) -> None:
    data = encode(picture(40, 20), "JPEG", exif=oriented(6))
    assert loader.probe(data) == (40, 20) == loader.decode(data).shape[:2]


def _chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def test_png_with_metadata_after_the_pixels_is_left_to_decode(loader: ImageLoader) -> None:
    """An eXIf chunk after IDAT is seen only by a full decode: the header alone cannot tell the size."""
    plain = encode(picture(40, 20), "PNG")
    iend = plain.rindex(b"IEND") - 4
    data = plain[:iend] + _chunk(b"eXIf", oriented(6).tobytes()) + plain[iend:]
    assert loader.decode(data).shape[:2] == (40, 20)  # Pillow applies it
    assert loader.probe(data) is None


@pytest.mark.parametrize(("data", "error", "message"), [
    (b"", InvalidImage, "image is empty"),
    (b"not an image at all", InvalidImage, "not a supported image format"),
    (encode(picture(1, 30), "PNG"), InvalidImage, "smallest accepted side"),
])
def test_probe_raises_what_decode_raises_on_the_header(loader: ImageLoader, data, error, message) -> None:
    with pytest.raises(error, match=message):
        loader.probe(data)
    with pytest.raises(error, match=message):
        loader.decode(data)


def test_probe_refuses_too_many_pixels_from_the_header(loader: ImageLoader) -> None:
    small = ImageLoader(max_bytes=2_000_000, max_pixels=100, min_side=2, fetcher=None)
    with pytest.raises(PayloadTooLarge, match="SAM3_MAX_IMAGE_PIXELS"):
        small.probe(encode(picture(), "PNG"))


def test_a_truncated_file_passes_the_probe_and_fails_at_decode(loader: ImageLoader) -> None:
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    cut = data[: len(data) // 2]
    assert loader.probe(cut) == (64, 64)
    image = EncoderInput(cut, None, 64, 64)
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        image.decoded(loader)


def test_encoder_input_decodes_bytes_or_passes_pixels(loader: ImageLoader) -> None:
    data = encode(picture(), "PNG")
    assert np.array_equal(EncoderInput(data, None, 30, 40).decoded(loader), loader.decode(data))
    pixels = np.zeros((5, 6, 3), np.uint8)
    assert EncoderInput(None, pixels, 5, 6).decoded(loader) is pixels
    with pytest.raises(InvalidImage, match="its header says 41x30"):
        EncoderInput(data, None, 30, 41).decoded(loader)


@pytest.mark.parametrize("payload", [bytes(range(256)) * 3, b"x", b"xy", b"xyz", b"\x00\xff" * 1000])
def test_canonical_and_lenient_base64_decode_alike(payload: bytes) -> None:
    canonical = base64.b64encode(payload).decode()
    urlsafe = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    wrapped = "\n".join(canonical[i : i + 76] for i in range(0, len(canonical), 76))
    for text in (canonical, urlsafe, wrapped, f"data:image/png;base64,{canonical}", f"  {canonical}\n"):
        assert decode_base64_payload(text, 1_000_000) == payload
