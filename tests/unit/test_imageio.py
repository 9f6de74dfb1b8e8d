"""ImageLoader and decode_base64_payload turn hostile input into RGB arrays or actionable 4xx errors."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from serve_app.core.errors import BadRequest, InvalidImage, PayloadTooLarge
from serve_app.core.security import UrlFetcher
from serve_app.image.imageio import ImageLoader, decode_base64_payload, image_digest

MAX_BYTES = 2_000_000


@pytest.fixture
def loader() -> ImageLoader:
    fetcher = UrlFetcher(allowlist=[], timeout_s=1.0, max_bytes=MAX_BYTES, max_redirects=0)
    return ImageLoader(max_bytes=MAX_BYTES, max_pixels=4_000_000, min_side=2, fetcher=fetcher)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def gradient(width: int = 40, height: int = 30) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 6, y * 8, (x + y) * 3], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


def noise_png(side: int = 64) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "PNG")


def png_header_only(width: int, height: int) -> bytes:
    """A ~100-byte PNG that declares width x height 8-bit grey pixels but carries only a few rows."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 2)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_round_trip_shape(loader: ImageLoader, fmt: str) -> None:
    out = loader.decode(encode(gradient(), fmt))
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    assert out.flags.c_contiguous and out.flags.writeable


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_round_trip_is_exact(loader: ImageLoader, fmt: str) -> None:
    np.testing.assert_array_equal(loader.decode(encode(gradient(), fmt)), np.asarray(gradient()))


def test_jpeg_round_trip_is_close(loader: ImageLoader) -> None:
    out = loader.decode(encode(gradient(), "JPEG", quality=95)).astype(int)
    assert np.abs(out - np.asarray(gradient()).astype(int)).mean() < 3


def test_rgba_drops_alpha(loader: ImageLoader) -> None:
    img = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert loader.decode(encode(img, "PNG"))[0, 0].tolist() == [10, 20, 30]


def test_la_drops_alpha(loader: ImageLoader) -> None:
    img = Image.new("LA", (8, 8), (90, 128))
    assert loader.decode(encode(img, "PNG"))[3, 3].tolist() == [90, 90, 90]


def test_greyscale_becomes_three_equal_channels(loader: ImageLoader) -> None:
    out = loader.decode(encode(Image.new("L", (8, 6), 77), "PNG"))
    assert out.shape == (6, 8, 3) and (out == 77).all()


def test_palette_image_keeps_its_colours(loader: ImageLoader) -> None:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (0, 0, 4, 8))
    out = loader.decode(encode(img, "PNG"))
    assert out[0, 0].tolist() == [0, 0, 255] and out[0, 7].tolist() == [255, 0, 0]


def test_transparent_palette_keeps_the_colour(loader: ImageLoader) -> None:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([12, 34, 56] + [0] * 765)
    assert loader.decode(encode(img, "PNG", transparency=0))[0, 0].tolist() == [12, 34, 56]


def test_sixteen_bit_greyscale_is_scaled_to_eight_bits(loader: ImageLoader) -> None:
    pixels = np.array([[0, 257 * 100], [65535, 257 * 200]], dtype=np.uint16).repeat(2, 0).repeat(2, 1)
    data = encode(Image.fromarray(pixels), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = loader.decode(data)
    assert out[:, :, 0].tolist() == [[0, 0, 100, 100], [0, 0, 100, 100], [255, 255, 200, 200], [255, 255, 200, 200]]


def test_cmyk_jpeg_becomes_rgb(loader: ImageLoader) -> None:
    out = loader.decode(encode(Image.new("CMYK", (16, 8), (0, 255, 255, 0)), "JPEG"))
    assert out.shape == (8, 16, 3)
    assert out[4, 8, 0] > 200 and out[4, 8, 1] < 60 and out[4, 8, 2] < 60


def test_bilevel_image_becomes_black_and_white(loader: ImageLoader) -> None:
    img = Image.new("1", (8, 8), 0)
    img.paste(1, (0, 0, 4, 8))
    out = loader.decode(encode(img, "PNG"))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 7].tolist() == [0, 0, 0]


def test_animated_gif_yields_first_frame(loader: ImageLoader) -> None:
    frames = [Image.new("RGB", (10, 10), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert loader.decode(data)[5, 5].tolist() == [255, 0, 0]


def test_exif_orientation_6_rotates_clockwise(loader: ImageLoader) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6
    out = loader.decode(encode(img, "JPEG", exif=exif, quality=95))
    assert out.shape == (40, 20, 3)  # portrait after rotating 90 degrees clockwise
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60  # the left (red) half is now on top
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60


def test_truncated_png_is_rejected(loader: ImageLoader) -> None:
    data = noise_png()
    with pytest.raises(InvalidImage, match="could not decode image: the file is truncated or corrupt"):
        loader.decode(data[: len(data) // 2])


def test_truncated_jpeg_is_rejected(loader: ImageLoader) -> None:
    data = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        loader.decode(data[: len(data) // 2])


def test_random_bytes_are_rejected(loader: ImageLoader) -> None:
    with pytest.raises(InvalidImage, match="not a supported image format"):
        loader.decode(np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def test_text_file_is_rejected(loader: ImageLoader) -> None:
    with pytest.raises(InvalidImage, match="not a supported image format") as info:
        loader.decode(b"name,score\nalice,3\nbob,5\n" * 20)
    assert "PNG" in info.value.message and info.value.status_code == 400


def test_postscript_is_not_handed_to_ghostscript(loader: ImageLoader) -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"
    with pytest.raises(InvalidImage, match="not a supported image format"):
        loader.decode(eps)


def test_empty_bytes_are_rejected(loader: ImageLoader) -> None:
    with pytest.raises(InvalidImage, match="empty"):
        loader.decode(b"")


@pytest.mark.parametrize(("size", "shown"), [((1, 1), "1x1"), ((1, 50), "1x50"), ((50, 1), "50x1")])
def test_too_small_image_is_rejected(loader: ImageLoader, size: tuple[int, int], shown: str) -> None:
    with pytest.raises(InvalidImage) as info:
        loader.decode(encode(Image.new("RGB", size), "PNG"))
    assert info.value.message == f"image is {shown} pixels; the smallest accepted side is 2"


def test_too_many_encoded_bytes_are_rejected(loader: ImageLoader) -> None:
    with pytest.raises(PayloadTooLarge, match="SAM3_MAX_IMAGE_BYTES"):
        loader.decode(b"\x89PNG" + b"\x00" * MAX_BYTES)


@pytest.mark.parametrize(("width", "height", "shown"), [(3000, 3000, "3000x3000"), (20000, 20000, "400000000")])
def test_decompression_bomb_is_rejected_before_decoding(
    loader: ImageLoader, monkeypatch: pytest.MonkeyPatch, width: int, height: int, shown: str
) -> None:
    def no_pixel_loading(self: Image.Image) -> None:
        raise AssertionError("pixel data must not be decoded for an oversized image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_pixel_loading)
    bomb = png_header_only(width, height)
    assert len(bomb) < 2000
    with pytest.raises(PayloadTooLarge) as info:
        loader.decode(bomb)
    assert shown in info.value.message
    assert "limit of 4000000 pixels" in info.value.message and "SAM3_MAX_IMAGE_PIXELS" in info.value.message


def test_pillow_limit_is_raised_to_the_configured_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    ImageLoader(max_bytes=MAX_BYTES, max_pixels=500_000_000, min_side=2, fetcher=UrlFetcher([], 1.0, 10, 0))
    assert Image.MAX_IMAGE_PIXELS == 500_000_000


def test_data_uri_is_accepted(loader: ImageLoader) -> None:
    data = encode(gradient(), "PNG")
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    assert decode_base64_payload(uri, MAX_BYTES) == data
    assert loader.decode(asyncio.run(loader.load_bytes(uri))).shape == (30, 40, 3)


def test_base64_with_newlines_is_accepted() -> None:
    data = encode(gradient(), "PNG")
    wrapped = base64.encodebytes(data).decode()
    assert "\n" in wrapped
    assert decode_base64_payload("  " + wrapped + "\r\n", MAX_BYTES) == data


def test_urlsafe_base64_without_padding_is_accepted() -> None:
    data = bytes(range(256)) * 3 + b"x"
    text = base64.urlsafe_b64encode(data).decode().rstrip("=")
    assert "-" in text and "_" in text
    assert decode_base64_payload(text, MAX_BYTES) == data


def test_raw_base64_source_is_loaded(loader: ImageLoader) -> None:
    data = encode(gradient(), "JPEG")
    assert asyncio.run(loader.load_bytes(base64.b64encode(data).decode())) == data


def test_truncated_base64_is_rejected() -> None:
    text = base64.b64encode(noise_png()).decode()
    cut = text[: (len(text) // 4) * 4 - 3]  # length % 4 == 1: no byte boundary
    with pytest.raises(InvalidImage, match="image is not valid base64: .*truncated"):
        decode_base64_payload(cut, MAX_BYTES)


def test_base64_truncated_on_a_byte_boundary_fails_at_decode(loader: ImageLoader) -> None:
    text = base64.b64encode(noise_png()).decode()
    data = asyncio.run(loader.load_bytes(text[: len(text) // 2]))
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        loader.decode(data)


@pytest.mark.parametrize("text", ["not base64 at all!", "abcd=efgh", "ab$d"])
def test_invalid_base64_is_rejected(text: str) -> None:
    with pytest.raises(InvalidImage, match="image is not valid base64"):
        decode_base64_payload(text, MAX_BYTES)


@pytest.mark.parametrize("text", ["", "   \n ", "data:image/png;base64,"])
def test_empty_payload_is_rejected(text: str) -> None:
    with pytest.raises(InvalidImage, match="image is empty"):
        decode_base64_payload(text, MAX_BYTES)


def test_data_uri_must_be_base64() -> None:
    with pytest.raises(InvalidImage, match="must be base64"):
        decode_base64_payload("data:image/svg+xml,<svg></svg>", MAX_BYTES)


def test_oversized_base64_is_rejected_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base64, "b64decode", lambda *a, **k: pytest.fail("must not decode"))
    with pytest.raises(PayloadTooLarge) as info:
        decode_base64_payload("A" * 4_000_000, MAX_BYTES)
    assert "limit of 2000000 bytes" in info.value.message and "SAM3_MAX_IMAGE_BYTES" in info.value.message


@pytest.mark.parametrize("source", ["file:///etc/passwd", "ftp://example.com/cat.png"])
def test_non_http_url_source_is_refused(loader: ImageLoader, source: str) -> None:
    with pytest.raises(BadRequest, match="only http and https"):
        asyncio.run(loader.load_bytes(source))


def test_internal_url_source_is_refused(loader: ImageLoader) -> None:
    with pytest.raises(BadRequest, match="SAM3_URL_ALLOWLIST"):
        asyncio.run(loader.load_bytes("http://169.254.169.254/latest/meta-data/"))


def test_image_digest_is_sha256_of_the_bytes() -> None:
    data = encode(gradient(), "PNG")
    assert image_digest(data) == hashlib.sha256(data).hexdigest()
    assert image_digest(data) != image_digest(data + b"\x00")
