"""Which model a name means, without torch: the built-in names, and the cheap check of a checkpoint's kind.

The CPU-side replicas (ingress, cache, job store and runner, web UI) read these and never load a model, so they
do not import torch (1.5 s of CPU and ~184 MB of RSS per process: importing deployments.cache
reached 383 MB of RSS with torch, 199 MB without); `serve_app.image.models` loads the models.
"""

from __future__ import annotations

import re
from pathlib import Path

from serve_app.core.errors import ModelLoadError

TINY_RANDOM = "tiny-random"
TINY_LITE = "tiny-random-lite"  # a tiny sam3_lite_text model: concept prompts only
TINY_SEED_RE = re.compile(r"^tiny-random:(\d{1,9})$")
FULL_RANDOM = "full-random"  # facebook/sam3's architecture with random weights: benchmarks without a download
TINY_SEED = 0


def tiny_seed(name: str) -> int | None:
    """The seed of `tiny-random` (0) or `tiny-random:<seed>`; None for any other source."""
    if name == TINY_RANDOM:
        return TINY_SEED
    match = TINY_SEED_RE.match(name)
    return int(match.group(1)) if match else None


def built_in_code(name: str) -> bool:
    """Models built from a config in code (no files): slow to build, cheap to copy to another process."""
    return name in (TINY_RANDOM, FULL_RANDOM, TINY_LITE) or bool(TINY_SEED_RE.match(name))


_HOW_TO_FIX = (
    "Set SAM3_MODEL to a directory written by save_pretrained, a hub id like facebook/sam3 (gated: accept its "
    "licence and set HF_TOKEN), or tiny-random."
)


def resolve_source(name: str) -> str:
    """A local directory (checked) or a hub id; raises ModelLoadError for paths that do not exist."""
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir() or not (local / "config.json").is_file():
            raise ModelLoadError(f"SAM3_MODEL={name!r} is not a model directory (no config.json). {_HOW_TO_FIX}")
        return str(local)
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"SAM3_MODEL={name!r}: directory does not exist. {_HOW_TO_FIX}")
    return name


def load_error(name: str, exc: Exception) -> ModelLoadError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return ModelLoadError(f"could not load SAM3 model {name!r}: {type(exc).__name__}: {first}. {_HOW_TO_FIX}")


SERVED_ARCHS = ("sam3_video", "sam3_lite_text")


def checkpoint_arch(name: str) -> str:
    """Cheap check (config only): the model exists, is reachable and is a sam3_video or sam3_lite_text checkpoint;
    returns which."""
    if built_in_code(name):
        return "sam3_lite_text" if name == TINY_LITE else "sam3_video"
    from transformers import AutoConfig

    source = resolve_source(name)
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - every loader failure becomes one start-up message
        raise load_error(name, exc) from exc
    if config.model_type not in SERVED_ARCHS:
        raise ModelLoadError(f"SAM3_MODEL={name!r} is a {config.model_type} checkpoint; a sam3_video (or "
                             "sam3_lite_text) one is needed")
    return config.model_type


def probe_model(name: str) -> None:
    """Start-up check of one source (see checkpoint_arch)."""
    checkpoint_arch(name)
