"""The files the batch tests feed a job: good images, and the three bad kinds (truncated, not an image, a bomb)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from serve_app.core.config import Config
from tests.integration.conftest import random_image

BOMB_SIDE = 100_000  # a header declaring 100000 x 100000 = 1e10 pixels
BAD_FILES = {  # name -> the error code the job records for it
    "truncated.png": "invalid_image",
    "notes.jpg": "invalid_image",
    "bomb.png": "payload_too_large",
}


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> bytes:
    """A valid PNG signature and IHDR declaring width x height, one tiny IDAT: a decompression bomb's header."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def write_images(folder: Path, seeds: list[int], height: int = 96, width: int = 128) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        path = folder / f"img{seed:03d}.png"
        path.write_bytes(png_bytes(random_image(seed, height, width)))
        paths.append(path)
    return paths


def write_bad_files(folder: Path) -> dict[str, str]:
    """The three bad inputs of the acceptance test; returns {absolute path: expected error code}."""
    folder.mkdir(parents=True, exist_ok=True)
    good = png_bytes(random_image(999))
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "notes.jpg").write_text("shopping list: eggs, milk\n")
    (folder / "bomb.png").write_bytes(bomb_png())
    return {str((folder / name).resolve()): code for name, code in BAD_FILES.items()}


def test_the_bomb_declares_more_pixels_than_the_limit_in_a_few_bytes():
    data = bomb_png()
    assert data[12:16] == b"IHDR" and struct.unpack(">II", data[16:24]) == (BOMB_SIDE, BOMB_SIDE)
    with pytest.raises(Image.DecompressionBombError):  # Pillow itself refuses to open it
        Image.open(io.BytesIO(data))
    assert BOMB_SIDE * BOMB_SIDE > Config().max_image_pixels
    assert len(data) < 200


def test_the_truncated_png_opens_but_cannot_be_decoded(tmp_path):
    write_bad_files(tmp_path)
    with Image.open(tmp_path / "truncated.png") as img:
        assert img.size == (128, 96)  # the header is intact...
        try:
            img.load()
        except OSError:
            return  # ...the pixel data is not
    raise AssertionError("the truncated PNG decoded")
