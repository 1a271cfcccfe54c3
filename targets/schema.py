"""Device profile schema: typed, strict (unknown keys and figures without units are errors).

A profile TOML file maps one to one onto these dataclasses: each field is a TOML key of the same name.
Fields whose metadata names a unit kind are written with their unit in the file ("68 GB/s") and held in
base units here (bytes, bytes/s, Hz, ops/s, W).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from edgellm import units

DEVICE_CLASSES = ("sbc", "embedded", "phone", "laptop", "desktop", "server")
CPU_ARCHS = ("x86_64", "aarch64")
ACCELERATOR_KINDS = ("gpu", "npu")

# ISA feature names in the probe's spelling (edgellm.probe.cpu), per architecture. Profiles list the subset a
# device has; tests hold the built-in profiles to this vocabulary so a typo ("avx-512") cannot slip in.
CPU_FEATURES = {
    "x86_64": ("sse3", "ssse3", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512bw",
               "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"),
    "aarch64": ("asimd", "fp16", "fhm", "dotprod", "i8mm", "bf16", "sve", "sve2", "sme"),
}


def _unit(kind: str, default: Any = dataclasses.MISSING) -> Any:
    return field(default=default, metadata={"unit": kind})


@dataclass(frozen=True)
class CpuCluster:
    core: str                      # core type, e.g. "Cortex-A78AE"
    cores: int
    max_clock: float = _unit("frequency")   # Hz


@dataclass(frozen=True)
class Cpu:
    arch: str                      # one of CPU_ARCHS
    clusters: tuple[CpuCluster, ...]
    features: tuple[str, ...]      # ISA features, probe spelling: "avx2", "asimd", "dotprod", "i8mm", ...
    model: str = ""

    @property
    def cores(self) -> int:
        return sum(c.cores for c in self.clusters)


@dataclass(frozen=True)
class Memory:
    total: int = _unit("bytes")            # installed RAM
    usable: int = _unit("bytes")           # what applications can really use after OS, firmware and carve-outs
    bandwidth: float = _unit("bandwidth")  # peak DRAM bandwidth, bytes/s
    unified: bool = False                  # CPU and accelerators share this memory (count it once)
    kind: str = ""                         # "LPDDR5", "DDR5", ...


@dataclass(frozen=True)
class Accelerator:
    kind: str                              # one of ACCELERATOR_KINDS
    name: str
    api: str                               # "cuda", "metal", "vulkan", "qnn", "coreml", "openvino", "dml"
    compute_capability: str = ""           # CUDA only, e.g. "8.7"
    int8_ops: float | None = _unit("ops", None)      # peak INT8 ops/s (TOPS * 1e12), where published
    memory: int | None = _unit("bytes", None)        # dedicated memory of a discrete GPU; None when unified
    bandwidth: float | None = _unit("bandwidth", None)  # dedicated memory bandwidth of a discrete GPU


@dataclass(frozen=True)
class PowerMode:
    name: str                              # e.g. "15W", "MAXN_SUPER"
    default: bool = False
    power: float | None = _unit("power", None)
    cpu_max_clock: float | None = _unit("frequency", None)
    gpu_max_clock: float | None = _unit("frequency", None)
    bandwidth: float | None = _unit("bandwidth", None)   # when the mode changes the memory clock


@dataclass(frozen=True)
class Source:
    figures: tuple[str, ...]               # dotted field names this source backs, e.g. "memory.bandwidth"
    title: str                             # datasheet or page title
    url: str = ""


@dataclass(frozen=True)
class DeviceProfile:
    id: str
    name: str
    device_class: str                      # one of DEVICE_CLASSES
    cpu: Cpu
    memory: Memory
    backends: tuple[str, ...]              # ids from edgellm.backends.BACKENDS, preferred first
    sources: tuple[Source, ...]
    aliases: tuple[str, ...] = ()
    accelerators: tuple[Accelerator, ...] = ()
    power_modes: tuple[PowerMode, ...] = ()
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (base units: bytes, bytes/s, Hz, ops/s, W)."""
        return dataclasses.asdict(self)
