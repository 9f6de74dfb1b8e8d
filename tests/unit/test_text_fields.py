"""Client strings the model or a key store sees: printable, bounded, real Unicode."""

from __future__ import annotations

import re

import pytest

from serve_app.core.config import Config
from serve_app.core.errors import InvalidPrompt
from serve_app.core.types import ConceptPrompt
from serve_app.image.prompts import check_text, validate_prompts


@pytest.mark.parametrize("value, words", [
    ("a\x00b", "control character (U+0000)"), ("cat\x1b[31m", "control character (U+001B)"),
    ("\ud800", "lone surrogate (U+D800)"), ("ok\udfffok", "lone surrogate"), ("x" * 257, "257 characters"),
])
def test_refused(value, words):
    with pytest.raises(InvalidPrompt, match=re.escape(words)):
        check_text(value, "the field")


@pytest.mark.parametrize("value", ["cat", "red car\twith\nlines\r", "\ufeff\u202e", "猫", "🐈 cat", "x" * 256])
def test_accepted(value):
    assert check_text(value, "the field") == value


def test_text_prompts_are_checked_for_every_provider():
    with pytest.raises(InvalidPrompt, match="the text prompt contains a control character"):
        validate_prompts([ConceptPrompt("a\x00b")], (10, 10), Config())
