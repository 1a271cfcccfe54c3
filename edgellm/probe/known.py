"""Public facts the probe looks things up in: core part numbers, Jetson modules, phone SoCs, Apple chips.

Figures are datasheet peaks; each table says where its numbers come from (details in
/work/shared/reference/onnx-and-devices.md sections 4 and 6).
"""

from __future__ import annotations

from dataclasses import dataclass

GB_S = 1e9   # bytes/s per GB/s

# /proc/cpuinfo "CPU implementer" -> vendor (Arm ARM, MIDR_EL1 implementer codes)
ARM_IMPLEMENTERS: dict[int, str] = {
    0x41: "ARM", 0x42: "Broadcom", 0x46: "Fujitsu", 0x48: "HiSilicon", 0x4E: "NVIDIA",
    0x51: "Qualcomm", 0x61: "Apple", 0xC0: "Ampere",
}

# ("CPU implementer", "CPU part") -> core name (Arm technical reference manuals, MIDR_EL1 part numbers)
ARM_CORES: dict[tuple[int, int], str] = {
    (0x41, 0xD03): "Cortex-A53", (0x41, 0xD05): "Cortex-A55", (0x41, 0xD08): "Cortex-A72",
    (0x41, 0xD09): "Cortex-A73", (0x41, 0xD0A): "Cortex-A75", (0x41, 0xD0B): "Cortex-A76",
    (0x41, 0xD0C): "Neoverse-N1", (0x41, 0xD0D): "Cortex-A77", (0x41, 0xD40): "Neoverse-V1",
    (0x41, 0xD41): "Cortex-A78", (0x41, 0xD42): "Cortex-A78AE", (0x41, 0xD44): "Cortex-X1",
    (0x41, 0xD46): "Cortex-A510", (0x41, 0xD47): "Cortex-A710", (0x41, 0xD48): "Cortex-X2",
    (0x41, 0xD49): "Neoverse-N2", (0x41, 0xD4D): "Cortex-A715", (0x41, 0xD4E): "Cortex-X3",
    (0x41, 0xD4F): "Neoverse-V2", (0x41, 0xD80): "Cortex-A520", (0x41, 0xD81): "Cortex-A720",
    (0x41, 0xD82): "Cortex-X4", (0x41, 0xD85): "Cortex-X925", (0x41, 0xD87): "Cortex-A725",
    (0x51, 0x001): "Oryon",
}


@dataclass(frozen=True)
class Memory:
    """A known device's DRAM: peak bandwidth and the source of that figure."""
    bandwidth: float          # bytes/s, theoretical peak
    kind: str                 # "LPDDR5", ...
    source: str


@dataclass(frozen=True)
class JetsonModule:
    name: str
    memory: Memory


_ORIN_NANO_DS = "Jetson Orin Nano Series datasheet DS-11105-001"
_ORIN_NANO_SUPER = (_ORIN_NANO_DS + "; Super mode (JetPack 6.1+, 25W or MAXN_SUPER) raises it to 102 GB/s, "
                    "check `nvpmodel -q`")
_ORIN_NX_DS = "Jetson Orin NX Series datasheet DS-10712-001"
_AGX_ORIN_DS = "Jetson AGX Orin Series datasheet DS-10662-001"

# Device-tree module id (from /proc/device-tree/compatible) -> module. Super mode (JetPack 6.1+) raises
# Orin Nano/NX memory clocks; it is a power mode, detected with nvpmodel, not from the module id.
JETSON_MODULES: dict[str, JetsonModule] = {
    "p3767-0005": JetsonModule("Jetson Orin Nano Developer Kit (8GB)", Memory(68 * GB_S, "LPDDR5", _ORIN_NANO_SUPER)),
    "p3767-0004": JetsonModule("Jetson Orin Nano 4GB", Memory(34 * GB_S, "LPDDR5", _ORIN_NANO_DS)),
    "p3767-0003": JetsonModule("Jetson Orin Nano 8GB", Memory(68 * GB_S, "LPDDR5", _ORIN_NANO_SUPER)),
    "p3767-0001": JetsonModule("Jetson Orin NX 8GB", Memory(102 * GB_S, "LPDDR5", _ORIN_NX_DS)),
    "p3767-0000": JetsonModule("Jetson Orin NX 16GB", Memory(102 * GB_S, "LPDDR5", _ORIN_NX_DS)),
    "p3701-0000": JetsonModule("Jetson AGX Orin", Memory(204.8 * GB_S, "LPDDR5", _AGX_ORIN_DS)),
    "p3701-0004": JetsonModule("Jetson AGX Orin 32GB", Memory(204.8 * GB_S, "LPDDR5", _AGX_ORIN_DS)),
    "p3701-0005": JetsonModule("Jetson AGX Orin 64GB", Memory(204.8 * GB_S, "LPDDR5", _AGX_ORIN_DS)),
}

# Device-tree SoC compatible -> (GPU name, CUDA compute capability). Orin is always sm_87.
JETSON_SOCS: dict[str, tuple[str, str]] = {
    "tegra234": ("Orin (nvgpu)", "8.7"),
    "tegra194": ("Xavier (nvgpu)", "7.2"),
}

# L4T major release -> JetPack series (NVIDIA Jetson Linux release notes)
JETPACK_BY_L4T: dict[str, str] = {"R32": "4.x", "R35": "5.x", "R36": "6.x", "R38": "7.x", "R39": "7.x"}


@dataclass(frozen=True)
class PhoneSoc:
    name: str
    gpu: str
    htp: str                   # Hexagon HTP architecture, as QNN names it
    memory: Memory | None      # None where no datasheet figure was found


# Android ro.soc.model -> SoC. HTP versions from QNN library packaging (libQnnHtpV75Skel.so: SM8650).
ANDROID_SOCS: dict[str, PhoneSoc] = {
    "SM8550": PhoneSoc("Snapdragon 8 Gen 2", "Adreno 740", "v73", None),
    "SM8650": PhoneSoc("Snapdragon 8 Gen 3", "Adreno 750", "v75",
                       Memory(76.8 * GB_S, "LPDDR5X", "Qualcomm Snapdragon 8 Gen 3 spec: LPDDR5X 4800 MHz, 64-bit")),
    "SM8750": PhoneSoc("Snapdragon 8 Elite", "Adreno 830", "v79",
                       Memory(84.8 * GB_S, "LPDDR5X", "Qualcomm Snapdragon 8 Elite spec: LPDDR5X 5300 MHz, 64-bit")),
    "SM8850": PhoneSoc("Snapdragon 8 Elite Gen 5", "Adreno 840", "v81", None),
}

_APPLE = "Apple product specifications (unified memory bandwidth)"

# machdep.cpu.brand_string -> unified memory. M1 figure: llama.cpp PR #1642 table.
APPLE_CHIPS: dict[str, Memory] = {
    "Apple M1": Memory(68.25 * GB_S, "LPDDR4X", _APPLE),
    "Apple M1 Pro": Memory(200 * GB_S, "LPDDR5", _APPLE),
    "Apple M1 Max": Memory(400 * GB_S, "LPDDR5", _APPLE),
    "Apple M1 Ultra": Memory(800 * GB_S, "LPDDR5", _APPLE),
    "Apple M2": Memory(100 * GB_S, "LPDDR5", _APPLE),
    "Apple M2 Pro": Memory(200 * GB_S, "LPDDR5", _APPLE),
    "Apple M2 Max": Memory(400 * GB_S, "LPDDR5", _APPLE),
    "Apple M2 Ultra": Memory(800 * GB_S, "LPDDR5", _APPLE),
    "Apple M3": Memory(100 * GB_S, "LPDDR5", _APPLE),
    "Apple M3 Pro": Memory(150 * GB_S, "LPDDR5", _APPLE),
    "Apple M3 Max": Memory(300 * GB_S, "LPDDR5", _APPLE + "; the 14-core CPU bin, 400 GB/s on the 16-core one"),
    "Apple M4": Memory(120 * GB_S, "LPDDR5X", _APPLE),
}

# Device-tree model prefix -> memory (single-board computers)
SBC_MODELS: dict[str, Memory] = {
    "Raspberry Pi 5": Memory(17.1 * GB_S, "LPDDR4X", "32-bit LPDDR4X-4267 bus per the Raspberry Pi 5 product "
                                                     "brief (computed: 4 B x 4267 MT/s)"),
}

# Intel NPU PCI device id -> generation (Linux intel_vpu driver device table)
INTEL_NPUS: dict[str, str] = {
    "7d1d": "Meteor Lake NPU", "ad1d": "Arrow Lake NPU", "643e": "Lunar Lake NPU",
    "b03e": "Panther Lake NPU", "fd3e": "Wildcat Lake NPU",
}

# Vulkan / PCI vendor id -> vendor
GPU_VENDORS: dict[int, str] = {
    0x10DE: "nvidia", 0x1002: "amd", 0x8086: "intel", 0x5143: "qualcomm", 0x13B5: "arm",
    0x106B: "apple", 0x14E4: "broadcom",
}

# SMBIOS chassis type (/sys/class/dmi/id/chassis_type) -> (name, device class or "" when it says nothing)
DMI_CHASSIS: dict[int, tuple[str, str]] = {
    1: ("Other", ""), 2: ("Unknown", ""), 3: ("Desktop", "desktop"), 4: ("Low Profile Desktop", "desktop"),
    5: ("Pizza Box", "desktop"), 6: ("Mini Tower", "desktop"), 7: ("Tower", "desktop"),
    8: ("Portable", "laptop"), 9: ("Laptop", "laptop"), 10: ("Notebook", "laptop"),
    11: ("Hand Held", ""), 13: ("All in One", "desktop"), 14: ("Sub Notebook", "laptop"),
    15: ("Space-saving", "desktop"), 16: ("Lunch Box", "desktop"), 17: ("Main Server Chassis", "server"),
    23: ("Rack Mount Chassis", "server"), 24: ("Sealed-case PC", "desktop"), 25: ("Multi-system chassis", "server"),
    28: ("Blade", "server"), 29: ("Blade Enclosure", "server"), 30: ("Tablet", "laptop"),
    31: ("Convertible", "laptop"), 32: ("Detachable", "laptop"), 35: ("Mini PC", "desktop"),
    36: ("Stick PC", "desktop"),
}
