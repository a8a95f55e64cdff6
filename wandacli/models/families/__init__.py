"""The model families wandacli knows, one module each (base.py says what a family declares).
A new family is a module here and one line in FAMILIES."""

from __future__ import annotations

from typing import Any

from wandacli.models.families import (
    gemma,
    gemma2,
    gpt2,
    gpt_neox,
    llama,
    mixtral,
    olmo2,
    phi3,
    qwen_moe,
)
from wandacli.models.families.base import Family, generic_family

FAMILIES: tuple[Family, ...] = (
    llama.FAMILY,
    gemma.FAMILY,
    gemma2.FAMILY,
    olmo2.FAMILY,
    gpt_neox.FAMILY,
    phi3.FAMILY,
    gpt2.FAMILY,
    mixtral.FAMILY,
    qwen_moe.FAMILY,
)
GENERIC = generic_family()
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}
_BY_NAME = {family.name: family for family in (*FAMILIES, GENERIC)}


def family_of_model_type(model_type: str | None) -> Family:
    """The family of a transformers `model_type` (generic for one nobody declared)."""
    return _BY_MODEL_TYPE.get(model_type or "", GENERIC)


def family_of_model(model: Any) -> Family:
    """The family of a loaded (or meta-device) transformers model."""
    return family_of_model_type(getattr(getattr(model, "config", None), "model_type", None))


def family_named(name: str | None) -> Family:
    """The family a stored set records by name (generic for sets made before families, or a
    family this version does not know)."""
    return _BY_NAME.get(name or "", GENERIC)
