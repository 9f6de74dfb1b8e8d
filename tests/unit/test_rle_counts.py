"""The vectorised COCO counts parser gives the checked parser's values on every string, and its errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from serve_app.core.errors import BadRequest
from serve_app.image import codecs


def _parse(fn, s: bytes):
    try:
        return list(np.asarray(fn(s)).tolist()), None
    except BadRequest as exc:
        return None, exc.message


def test_real_masks_parse_to_pycocotools_counts():
    for seed in range(200):
        rng = np.random.default_rng(seed)
        h, w = int(rng.integers(1, 80)), int(rng.integers(1, 80))
        mask = rng.random((h, w)) < rng.random()
        counts = codecs.rle_encode(mask)["counts"].encode()
        expected = mask_utils.frPyObjects(  # round trip through pycocotools' own uncompressed form
            {"size": [h, w], "counts": codecs._compressed_counts_checked(counts)}, h, w)
        assert codecs._compressed_counts(counts).tolist() == codecs._compressed_counts_checked(counts)
        assert np.array_equal(mask_utils.decode(expected).astype(bool), mask)


def test_random_strings_give_the_same_values_or_the_same_error():
    rng = random.Random(1)
    alphabet = bytes(range(40, 120))  # around the valid range 48..111, both sides
    outcomes = {"values": 0, "errors": 0}
    for _ in range(5000):
        s = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        fast, slow = _parse(codecs._compressed_counts, s), _parse(codecs._compressed_counts_checked, s)
        assert fast == slow, s
        outcomes["values" if slow[0] is not None else "errors"] += 1
    assert min(outcomes.values()) > 500, outcomes  # both branches were exercised


@pytest.mark.parametrize(("counts", "message"), [
    ("0" * 3 + "\x7f", "invalid character"),
    ("o" * 8 + "0", "truncated or malformed"),  # more than 7 characters in one value
    ("0o", "truncated or malformed"),  # ends inside a value
])
def test_malformed_counts_are_refused_with_the_reason(counts: str, message: str):
    with pytest.raises(BadRequest, match=message):
        codecs.rle_decode({"size": [2, 2], "counts": counts})


def test_counts_that_overflow_the_mask_are_refused():
    good = codecs.rle_encode(np.eye(4, dtype=bool))
    assert np.array_equal(codecs.rle_decode(good), np.eye(4, dtype=bool))
    with pytest.raises(BadRequest, match="do not add up"):
        codecs.rle_decode({"size": [4, 3], "counts": good["counts"]})
    huge = codecs.rle_encode(np.zeros((1, 1), bool))["counts"]
    with pytest.raises(BadRequest, match="do not add up"):
        codecs.rle_decode({"size": [2**40, 2**40], "counts": huge})


def test_encode_many_equals_one_by_one_for_bool_and_integer_masks():
    rng = np.random.default_rng(3)
    masks = rng.random((5, 33, 47)) < 0.4
    one_by_one = [codecs.rle_encode(m) for m in masks]
    assert codecs.rle_encode_many(masks) == one_by_one
    assert codecs.rle_encode_many(masks.astype(np.uint8) * 7) == one_by_one
    assert codecs.rle_encode_many(np.zeros((0, 4, 4), bool)) == []
