"""The planner's data tables (efficiency and quality priors), read once from package data.

The planner itself reads no files: ``plan()`` receives a ``Tables``; ``builtin_tables()`` is what the public
``fit()`` passes, optionally with a device calibration applied (``speed.apply_calibration``).
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass, field, replace
from typing import Mapping
from importlib import resources

from edgellm.fitting.onnx_plan import OrtMemory, ort_memory_from_dict
from edgellm.fitting.quality import QualityPriors, priors_from_dict
from edgellm.fitting.speed import Calibration, SpeedTables, apply_calibration, tables_from_dict

EFFICIENCY_FILE = "efficiency.toml"
QUALITY_FILE = "quality_priors.toml"


@dataclass(frozen=True)
class Tables:
    speed: SpeedTables
    quality: QualityPriors
    calibration: Calibration | None = None    # the device calibration applied to ``speed``, if any
    onnx_memory: Mapping[str, OrtMemory] = field(default_factory=dict)   # ONNX Runtime overhead by backend

    def calibrated(self, calibration: Calibration | None) -> "Tables":
        """These tables with ``calibration``'s measured rows taking precedence (unchanged for None)."""
        return replace(self, speed=apply_calibration(self.speed, calibration), calibration=calibration)


def _data(name: str) -> dict:
    return tomllib.loads(resources.files("edgellm").joinpath("data", name).read_text(encoding="utf-8"))


@functools.cache
def builtin_tables() -> Tables:
    """The tables shipped in ``edgellm/data``."""
    efficiency = _data(EFFICIENCY_FILE)
    return Tables(speed=tables_from_dict(efficiency), quality=priors_from_dict(_data(QUALITY_FILE)),
                  onnx_memory=ort_memory_from_dict(efficiency["onnx_memory"]))
