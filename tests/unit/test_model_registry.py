"""The model registry: SAM3_MODELS parsing, the default, and what a request's model field resolves to."""

from __future__ import annotations

import pytest

from serve_app.core.config import Config
from serve_app.core.registry import (
    LITE_ARCH,
    SHORTHAND_NAME,
    VIDEO_ARCH,
    ModelSpec,
    Registry,
    RegistryError,
    UnknownModel,
    parse_models,
)
from serve_app.image.models import built_in_code, checkpoint_arch


def test_the_shorthand_serves_sam3_model_alone_under_one_name():
    registry = Registry.from_config(Config(model="tiny-random"))
    assert registry.names == [SHORTHAND_NAME] and registry.default == SHORTHAND_NAME
    assert registry.resolve(None).source == "tiny-random" and registry.resolve("").name == SHORTHAND_NAME


def test_models_in_order_the_first_is_the_default_unless_named():
    config = Config(models="base=tiny-random, alt=tiny-random:1 ,lite=tiny-random-lite")
    registry = Registry.from_config(config)
    assert registry.names == ["base", "alt", "lite"] and registry.default == "base"
    assert registry.resolve("alt") == ModelSpec("alt", "tiny-random:1")
    assert Registry.from_config(config.model_copy(update={"default_model": "lite"})).default == "lite"
    assert registry.config_for(config, "alt").model == "tiny-random:1"


@pytest.mark.parametrize("value", ["base", "base=", "=tiny-random", "b a=tiny-random", "a=x,a=y", "-a=tiny-random",
                                   "x" * 65 + "=tiny-random"])
def test_malformed_registries_are_refused_with_the_entry_named(value):
    with pytest.raises(RegistryError):
        parse_models(value)


def test_a_default_not_in_the_registry_or_a_malformed_registry_stops_the_configuration():
    with pytest.raises(ValueError, match="SAM3_DEFAULT_MODEL"):
        Config(models="a=tiny-random", default_model="b")
    with pytest.raises(ValueError, match="SAM3_MODELS.*twice"):
        Config.from_env({"SAM3_MODELS": "a=tiny-random,a=tiny-random:1"})


@pytest.mark.parametrize("name", ["nope", "BASE", "base ", "../base", "\x00", "sam3/sam3_final"])
def test_an_unknown_model_is_a_404_that_lists_the_served_ones(name):
    registry = Registry.from_config(Config(models="base=tiny-random,alt=tiny-random:1"))
    with pytest.raises(UnknownModel) as caught:
        registry.resolve(name)
    assert caught.value.status_code == 404 and caught.value.code == "model_not_found"
    assert "base, alt" in str(caught.value) and "\x00" not in str(caught.value)


def test_built_in_sources_and_their_architectures():
    assert built_in_code("tiny-random:7") and built_in_code("tiny-random-lite")
    assert not built_in_code("/models/sam3-ft")
    assert checkpoint_arch("tiny-random:3") == VIDEO_ARCH and checkpoint_arch("tiny-random-lite") == LITE_ARCH
