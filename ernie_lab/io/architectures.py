"""The architecture registry: what the kit builds for each ``model_type`` a config.json names.

    model_type         config class   model class                        Hub name table
    ernie4_5           ErnieConfig    ErnieForCausalLM                   hub_names.NAME_MAP
    ernie4_5_moe       ErnieConfig    ErnieForCausalLM                   hub_names.NAME_MAP
    ernie4_5_vl_moe    VLConfig       ErnieVLForConditionalGeneration    hub_names.VL_NAME_MAP

Loading and saving look the model type up here and name no model class themselves, so a new
architecture is one more entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import hub_names
from ..model.config import ErnieConfig, VLConfig
from ..errors import ConfigError
from ..model.decoder import ErnieForCausalLM
from ..model.vl_model import ErnieVLForConditionalGeneration


@dataclass(frozen=True)
class Architecture:
    model_type: str
    config_class: type
    model_class: type
    name_table: list


REGISTRY: dict[str, Architecture] = {
    arch.model_type: arch for arch in (
        Architecture("ernie4_5", ErnieConfig, ErnieForCausalLM, hub_names.NAME_MAP),
        Architecture("ernie4_5_moe", ErnieConfig, ErnieForCausalLM, hub_names.NAME_MAP),
        Architecture("ernie4_5_vl_moe", VLConfig, ErnieVLForConditionalGeneration, hub_names.VL_NAME_MAP),
    )
}


def architecture(config) -> Architecture:
    """The registry entry of a parsed config (``config.model_type``)."""
    try:
        return REGISTRY[config.model_type]
    except KeyError:
        raise ConfigError(f"model_type {config.model_type!r} is not in the kit's registry; known: "
                          f"{', '.join(REGISTRY)}.") from None


def build(config):
    """An ernie-lab model for a parsed config (random weights, on the current default device)."""
    return architecture(config).model_class(config)


def name_table(config) -> list:
    """The Hub <-> ernie-lab name table of a config's architecture."""
    return architecture(config).name_table
