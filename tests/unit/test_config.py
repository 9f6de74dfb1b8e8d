"""Config: read from SAM3_* variables, validated with messages that name the variable, all documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.core.config import Config, knob_table

CONFIG_PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_defaults_work_without_environment():
    config = Config.from_env({})
    assert (config.model, config.host, config.port, config.api_keys) == ("tiny-random", "127.0.0.1", 8000, [])


def test_reads_and_converts_variables():
    config = Config.from_env({"SAM3_PORT": "9000", "SAM3_API_KEYS": "a, b,", "SAM3_ENCODER_NUM_GPUS": "0.25"})
    assert (config.port, config.api_keys, config.encoder_num_gpus) == (9000, ["a", "b"], 0.25)


def test_overrides_win_over_environment():
    assert Config.from_env({"SAM3_PORT": "9000"}, port=9100).port == 9100


@pytest.mark.parametrize(
    "name,value", [("SAM3_PORT", "x"), ("SAM3_PORT", "70000"), ("SAM3_DTYPE", "int8"), ("SAM3_ENCODER_MAX_BATCH_SIZE", "0")]
)
def test_invalid_values_name_the_variable(name, value):
    with pytest.raises(ValueError, match=name):
        Config.from_env({name: value})


def _documented_table() -> str:
    text = CONFIG_PAGE.read_text()
    start, end = "<!-- knobs:start -->\n", "\n<!-- knobs:end -->"
    assert start in text and end in text, f"{CONFIG_PAGE.name} lost its knob table markers"
    return text[text.index(start) + len(start) : text.index(end)].strip()


def test_the_configuration_page_lists_every_knob_as_config_py_defines_it():
    """The table is generated (`python -m serve_app.core.config`); a new, renamed or re-defaulted knob fails here."""
    assert _documented_table() == knob_table(), (
        "docs/configuration.md is out of date: paste `python -m serve_app.core.config` between its knob markers"
    )


def test_every_knob_is_in_exactly_one_topic():
    from serve_app.core.config import TOPICS

    listed = [field for fields in TOPICS.values() for field in fields]
    assert sorted(listed) == sorted(Config.model_fields), (
        f"TOPICS in serve_app/core/config.py: missing {sorted(set(Config.model_fields) - set(listed))}, "
        f"unknown {sorted(set(listed) - set(Config.model_fields))}, twice {sorted({f for f in listed if listed.count(f) > 1})}"
    )


def test_the_page_holds_one_knob_table_the_generated_one():
    """Hand-written knob tables drift from the code: every `| `SAM3_...` |` row of the page is inside the markers."""
    text = CONFIG_PAGE.read_text()
    outside = text.replace(_documented_table(), "")
    rows = [line for line in outside.splitlines() if line.startswith("| `SAM3_")]
    assert rows == [], f"knob rows outside the generated table: {rows[:3]}"


@pytest.mark.parametrize("field", list(Config.model_fields))
def test_every_knob_is_described(field):
    assert Config.model_fields[field].description, f"give SAM3_{field.upper()} a Field(description=...)"
    assert f"`SAM3_{field.upper()}`" in _documented_table()


def test_video_routes_may_carry_a_whole_video():
    from serve_app.core.http import body_limit

    config = Config(max_request_bytes=1_000_000, video_max_bytes=3_000_000)
    assert body_limit("/v1/image/segment", config) == (1_000_000, "SAM3_MAX_REQUEST_BYTES")
    limit, knob = body_limit("/v1/video/sessions", config)
    assert knob == "SAM3_VIDEO_MAX_BYTES" and limit >= 3_000_000 * 4 // 3  # base64 in JSON too
    assert body_limit("/api/ai/videos/generate", config)[1] == "SAM3_VIDEO_MAX_BYTES"
