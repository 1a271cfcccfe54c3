"""What the probe found, as plain dataclasses. Sizes in bytes, frequencies in Hz, bandwidth in bytes/s."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class OsInfo:
    system: str              # "linux", "android" or "darwin"
    name: str                # "Debian GNU/Linux 12 (bookworm)", "Android 14 (SDK 34)", "macOS 14.5"
    kernel: str              # uname release
    machine: str             # uname machine as reported: "x86_64", "aarch64", "arm64"


@dataclass(frozen=True)
class JetsonInfo:
    l4t: str                 # "R36.4.3"
    jetpack: str             # "6.x", from the L4T major release
    module: str              # "p3767-0005"; "" when the device tree names none we know
    module_name: str         # "Jetson Orin Nano Developer Kit"
    soc: str                 # "tegra234"


@dataclass(frozen=True)
class BoardInfo:
    model: str               # device-tree model, DMI product, Mac hw.model or Android ro.product.model
    vendor: str
    soc: str                 # "SM8650", "tegra234", "Apple M2"; "" when unknown
    chassis: str             # SMBIOS chassis type name; "" when there is no DMI
    battery: bool            # a battery is present (a portable machine)
    virtual: bool            # running under a hypervisor
    jetson: JetsonInfo | None = None


@dataclass(frozen=True)
class Cluster:
    core: str                # "Cortex-A78AE", "P-core", or the CPU model on a uniform x86 CPU
    cpus: tuple[int, ...]    # logical CPU numbers
    physical_cores: int
    max_freq_hz: float | None   # None when the OS does not say (VMs, macOS)


@dataclass(frozen=True)
class CpuInfo:
    arch: str                # "x86_64" or "aarch64" (others as uname says)
    model: str
    vendor: str              # "GenuineIntel", "AuthenticAMD", "ARM", "Qualcomm", "Apple", ...
    features: tuple[str, ...]   # ISA features the probe knows (cpu.py tables), on every core
    physical_cores: int
    logical_cores: int
    clusters: tuple[Cluster, ...]   # fastest first


@dataclass(frozen=True)
class MemoryInfo:
    total: int
    available: int           # what a new process can get now without swapping
    swap_total: int
    swap_free: int


@dataclass(frozen=True)
class GpuInfo:
    name: str
    vendor: str              # "nvidia", "amd", "intel", "apple", "qualcomm", ...
    apis: tuple[str, ...]    # "cuda", "metal", "vulkan", "opencl"
    integrated: bool
    unified_memory: bool     # shares host RAM: budget models against host memory, count it once
    memory_total: int | None = None    # dedicated memory; None when unified or not reported
    memory_free: int | None = None
    compute_capability: str = ""       # CUDA only, "8.7"
    driver: str = ""
    detected_by: str = ""


@dataclass(frozen=True)
class NpuInfo:
    name: str
    vendor: str
    api: str                 # "qnn", "coreml", "openvino"
    detail: str              # "HTP v75", "Meteor Lake NPU (8086:7d1d), /dev/accel/accel0"
    detected_by: str


@dataclass(frozen=True)
class LlamaCppInfo:
    installed: bool
    version: str = ""
    gpu_offload: bool = False
    registries: dict[str, dict[str, str]] = field(default_factory=dict)   # "CPU" -> {"AVX2": "1", ...}
    system_info: str = ""    # llama_print_system_info() as printed


@dataclass(frozen=True)
class OnnxRuntimeInfo:
    installed: bool
    version: str = ""
    providers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Considered:
    backend: str
    usable: bool
    hardware: bool           # the hardware it needs is present (so a rejection is a real fallback)
    reason: str
    hint: str = ""           # what to install or rebuild to make it usable


@dataclass(frozen=True)
class BackendChoice:
    format: str              # "gguf" or "onnx"
    backend: str             # id in edgellm.backends.BACKENDS
    reason: str
    ready: bool              # the runtime is installed; False: what it would use once installed
    considered: tuple[Considered, ...]   # every candidate, in preference order, with why (not)

    @property
    def usable(self) -> tuple[str, ...]:
        """Usable backends in preference order, the chosen one first."""
        rest = [c.backend for c in self.considered if c.usable and c.backend != self.backend]
        return (self.backend, *rest)


@dataclass(frozen=True)
class BandwidthInfo:
    bytes_per_s: float
    measured: bool
    basis: str               # how the figure was obtained


@dataclass(frozen=True)
class MachineInfo:
    os: OsInfo
    board: BoardInfo
    cpu: CpuInfo
    memory: MemoryInfo
    gpus: tuple[GpuInfo, ...]
    npus: tuple[NpuInfo, ...]
    llama_cpp: LlamaCppInfo
    onnxruntime: OnnxRuntimeInfo
    gguf: BackendChoice
    onnx: BackendChoice
    bandwidth: BandwidthInfo
    device_class: str        # one of edgellm.targets DEVICE_CLASSES
    device_class_reason: str
    commands: dict[str, bool]   # external commands run -> whether they answered
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form; each backend choice also lists its usable backends."""
        data = dataclasses.asdict(self)
        for key in ("gguf", "onnx"):
            data[key]["usable"] = list(getattr(self, key).usable)
        return data
