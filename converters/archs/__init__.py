"""Architecture registry: HF ``model_type`` -> the module of the same name (its ``ARCH`` record).

Modules are imported on first use. ``ALIASES`` is the one place where a model_type is served by a module
of another name.
"""

from __future__ import annotations

import importlib

from edgellm.converters.archs.common import Architecture
from edgellm.errors import UnsupportedArchitectureError

MODULES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")

# model_type -> module
ALIASES = {
    "gemma3_text": "gemma3",    # Gemma3ForCausalLM (text-only checkpoints, e.g. gemma-3-270m / 1b)
}


def supported() -> list[str]:
    """Every model_type the converter accepts."""
    return sorted(set(MODULES) | set(ALIASES))


def get(model_type: str | None) -> Architecture:
    """The architecture record for ``model_type``.

    Raises:
        UnsupportedArchitectureError: for a model_type without a module (the message lists the supported ones).
    """
    name = ALIASES.get(model_type or "", model_type or "")
    if name not in MODULES:
        raise UnsupportedArchitectureError(model_type=str(model_type), supported=supported())
    return importlib.import_module(f"edgellm.converters.archs.{name}").ARCH
