"""The model registry: the named SAM3 checkpoints one service serves, and the one a request picks.

`SAM3_MODELS` lists them as comma-separated `name=source` pairs; a source is anything `SAM3_MODEL` accepts
(`tiny-random`, `full-random`, a hub id, a `save_pretrained` directory) plus `tiny-random:<seed>` (tiny-random's
architecture with other random weights) and `tiny-random-lite` (a tiny `sam3_lite_text` model: concept prompts
only). With `SAM3_MODELS` empty the service serves `SAM3_MODEL` alone, under the name `sam3`. The default model is
`SAM3_DEFAULT_MODEL`, or else the first one listed.

Torch-free: the ingress resolves names here before a byte of the image is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from serve_app.core.config import Config
from serve_app.core.errors import BadRequest, NotFound

SHORTHAND_NAME = "sam3"  # the name of SAM3_MODEL when SAM3_MODELS is empty
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
VIDEO_ARCH, LITE_ARCH = "sam3_video", "sam3_lite_text"
LITE_ONLY = ("model {model!r} is a sam3_lite_text model: it segments concepts (text and exemplar boxes) only; "
             "clicks, boxes as visual prompts, automatic masks and video need a sam3_video model")


class UnknownModel(NotFound):
    code = "model_not_found"


class RegistryError(ValueError):
    """SAM3_MODELS / SAM3_DEFAULT_MODEL do not describe a registry: the service does not start."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str


def parse_models(value: str) -> list[ModelSpec]:
    """`name=source,name=source` -> specs, in order. Raises RegistryError on a malformed or repeated entry."""
    specs: list[ModelSpec] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        name, sep, source = entry.partition("=")
        name, source = name.strip(), source.strip()
        if not sep or not source:
            raise RegistryError(f"SAM3_MODELS entry {entry[:80]!r} is not name=source")
        if not NAME_RE.match(name):
            raise RegistryError(f"SAM3_MODELS name {name[:80]!r}: 1 to 64 of letters, digits, '.', '_' and '-', "
                                "starting with a letter or digit")
        if any(s.name == name for s in specs):
            raise RegistryError(f"SAM3_MODELS names {name!r} twice")
        specs.append(ModelSpec(name, source))
    return specs


class Registry:
    """Name -> ModelSpec, with the default; `resolve` maps a request's field (None = the default) to a spec."""

    def __init__(self, specs: list[ModelSpec], default: str | None = None, listed: bool = True) -> None:
        self.listed = listed  # False: SAM3_MODEL alone (the shorthand), not a SAM3_MODELS list
        if not specs:
            raise RegistryError("no model to serve: set SAM3_MODEL or SAM3_MODELS")
        self.specs = {s.name: s for s in specs}
        self.default = default or specs[0].name
        if self.default not in self.specs:
            raise RegistryError(f"SAM3_DEFAULT_MODEL={self.default!r} is not in SAM3_MODELS "
                                f"({', '.join(self.specs)})")

    @classmethod
    def from_config(cls, config: Config) -> Registry:
        if config.models.strip():
            return cls(parse_models(config.models), config.default_model or None)
        return cls([ModelSpec(SHORTHAND_NAME, config.model)], config.default_model or None, listed=False)

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    def resolve(self, name: str | None) -> ModelSpec:
        """The spec a request names (None or '' = the default); 404 `model_not_found` for any other name."""
        if name is None or name == "":
            return self.specs[self.default]
        if not isinstance(name, str):
            raise BadRequest("model must be a string")
        spec = self.specs.get(name)
        if spec is None:
            shown = name[:80].encode("unicode_escape").decode("ascii")
            raise UnknownModel(f"model {shown!r} is not served here; served: {', '.join(self.specs)} "
                               "(GET /v1/models)")
        return spec

    def config_for(self, config: Config, name: str) -> Config:
        """`config` with SAM3_MODEL set to `name`'s source: what load_bundle and the video actors read."""
        return config.model_copy(update={"model": self.specs[name].source})

