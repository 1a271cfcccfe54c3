"""Hardware probe: what this machine (or a recorded one) has, and which backends it would use.

Public API:
    probe(root=None, measure=False) -> MachineInfo      (``MachineInfo.to_dict()`` for JSON)
    local_profile(measure=False, root=None) -> DeviceProfile   (the device profile ``local``)
    LiveRoot, FixtureRoot, Root                         (where the probe reads from)
"""

from __future__ import annotations

from edgellm.probe.info import (
    BackendChoice, BandwidthInfo, BoardInfo, Cluster, Considered, CpuInfo, GpuInfo, JetsonInfo, LlamaCppInfo,
    MachineInfo, MemoryInfo, NpuInfo, OnnxRuntimeInfo, OsInfo,
)
from edgellm.probe.machine import probe
from edgellm.probe.profile import build_profile
from edgellm.probe.root import COMMANDS, FixtureRoot, LiveRoot, Root
from edgellm.targets.schema import DeviceProfile

__all__ = [
    "BackendChoice", "BandwidthInfo", "BoardInfo", "COMMANDS", "Cluster", "Considered", "CpuInfo", "FixtureRoot",
    "GpuInfo", "JetsonInfo", "LiveRoot", "LlamaCppInfo", "MachineInfo", "MemoryInfo", "NpuInfo",
    "OnnxRuntimeInfo", "OsInfo", "Root", "build_profile", "local_profile", "probe",
]


def local_profile(measure: bool = False, root: Root | None = None) -> DeviceProfile:
    """The device profile of this machine, id ``local``, built from ``probe(root, measure)``.

    memory.usable is the RAM available at probe time; memory.bandwidth is measured when ``measure`` is
    true and estimated otherwise, with the basis written in a Source entry.

    Raises:
        ProbeError: when an essential source cannot be read.
    """
    return build_profile(probe(root=root, measure=measure))
