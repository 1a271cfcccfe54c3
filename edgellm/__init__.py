"""edgellm: take a language model and make it run well on a specific edge device.

The public API, imported on first use so that ``import edgellm`` stays light::

    edgellm.resolve_device("jetson-orin")             # profile id, alias, "local" or a .toml file
    edgellm.convert("hf-model/", "model.gguf", type="q4_k_m", imatrix="auto")
    plan = edgellm.fit("hf-model/", "raspberry-pi-5")  # -> Plan (nothing written)
    bundle = edgellm.build(plan, "bundle/")            # -> Bundle, written atomically
    rt = edgellm.Runtime.load("bundle/")              # generate, stream, chat
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute). Names of submodules (probe, bench, evaluate) are not repeated here:
# importing a submodule binds its name on the package, which would shadow a function of the same name.
_LAZY = {
    "resolve_device": ("edgellm.targets", "resolve_device"),
    "convert": ("edgellm.converters", "convert"),
    "fit": ("edgellm.fitting", "fit"),
    "build": ("edgellm.fitting", "build"),
    "Runtime": ("edgellm.runtime", "Runtime"),
    "GenerationSettings": ("edgellm.runtime", "GenerationSettings"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'edgellm' has no attribute {name!r}")
