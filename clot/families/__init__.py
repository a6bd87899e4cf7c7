"""Model families the engine serves, one small module each (transformers-style).

`family_for(config)` picks one by the config's `model_type`; the engine, prefix sharing and training
ask it for everything that differs between architectures, and stay family-agnostic themselves.
Qwen2.5-VL is the default base model; Qwen-VL-Chat is the base of the authors' CLoT-cn adapter.
"""

from __future__ import annotations

from clot import models  # noqa: F401  (registers Qwen-VL with transformers' Auto classes)
from clot.families.base import Family, positions_from_mask
from clot.families.qwen2_5_vl import Qwen25VL
from clot.families.qwen_vl import QwenVL
from clot.tasks import ClotError

FAMILIES: list[type[Family]] = [Qwen25VL, QwenVL]

__all__ = ["FAMILIES", "Family", "Qwen25VL", "QwenVL", "family_for", "positions_from_mask"]


def family_for(config) -> Family:
    """The family of a loaded model's (or checkpoint's) config."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family(config)
    supported = ", ".join(f"{t} ({f.name})" for f in FAMILIES for t in f.model_types)
    raise ClotError(f"Model type {model_type!r} is not supported; supported model types: {supported}.")
