"""Weight memory of one loaded model per source, for docs/models.md: parameters and buffers, counted on torch's meta
device (nothing is allocated, nothing downloaded), in float32 and bfloat16.

    .venv/bin/python load_tests/model_memory.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def elements(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


def main() -> None:
    from transformers import Sam3LiteTextConfig, Sam3LiteTextModel, Sam3VideoConfig, Sam3VideoModel

    from serve_app.image.models import tiny_lite_config, tiny_video_config

    builds = [
        ("`tiny-random`, `tiny-random:<seed>`", lambda: Sam3VideoModel(tiny_video_config())),
        ("`tiny-random-lite`", lambda: Sam3LiteTextModel(tiny_lite_config())),
        ("`facebook/sam3` (and `full-random`)", lambda: Sam3VideoModel(Sam3VideoConfig())),
        ("sam3_lite_text at Sam3LiteTextConfig's defaults", lambda: Sam3LiteTextModel(Sam3LiteTextConfig())),
    ]
    print("| source | parameters and buffers | float32 | bfloat16 |")
    print("|---|---|---|---|")
    for name, build in builds:
        with torch.device("meta"):
            count = elements(build())
        print(f"| {name} | {count / 1e6:,.1f} M | {count * 4 / 2**20:,.0f} MiB | {count * 2 / 2**20:,.0f} MiB |")


if __name__ == "__main__":
    main()
