"""GPUs: NVIDIA (nvidia-smi), Jetson iGPUs, Apple silicon (Metal), Vulkan devices, phone GPUs.

Integrated GPUs (Jetson, Apple, phones, laptop iGPUs) share host RAM: they are marked ``unified_memory``
and models are budgeted against host memory. On Jetson nvidia-smi reports "Orin (nvgpu)" with memory
"[N/A]" (reference: onnx-and-devices.md 6.3), which is why its memory is left None here.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import re

from edgellm.probe import known
from edgellm.probe.info import BoardInfo, GpuInfo
from edgellm.probe.system import Host

log = logging.getLogger(__name__)

MIB = 2**20
_NOT_REPORTED = {"", "[N/A]", "N/A", "[Not Supported]", "Not Supported"}
NVIDIA_SMI_FIELDS = ("name", "memory_total", "memory_free", "compute_cap", "driver")   # COMMANDS column order

# vulkaninfo deviceType -> integrated; CPU (software) devices are not GPUs and are skipped
VULKAN_TYPES = {"PHYSICAL_DEVICE_TYPE_DISCRETE_GPU": False, "PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU": True,
                "PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU": False}


def _reported(value: str) -> str:
    return "" if value.strip() in _NOT_REPORTED else value.strip()


def _mib(value: str) -> int | None:
    value = _reported(value)
    return int(float(value) * MIB) if value else None


def parse_nvidia_smi(text: str) -> list[dict[str, str]]:
    """CSV rows of the COMMANDS query -> dicts keyed by NVIDIA_SMI_FIELDS, "" where not reported."""
    rows = [r for r in csv.reader(io.StringIO(text), skipinitialspace=True) if len(r) == len(NVIDIA_SMI_FIELDS)]
    return [{k: _reported(v) for k, v in zip(NVIDIA_SMI_FIELDS, row)} for row in rows]


def _nvidia(host: Host, board: BoardInfo) -> list[GpuInfo]:
    out = host.r.command("nvidia-smi")
    jetson = board.jetson
    gpus = []
    for row in parse_nvidia_smi(out or ""):
        integrated = jetson is not None or "nvgpu" in row["name"]
        soc_cc = known.JETSON_SOCS.get(jetson.soc, ("", ""))[1] if jetson else ""
        gpus.append(GpuInfo(row["name"], "nvidia", ("cuda",), integrated, integrated,
                            None if integrated else _mib(row["memory_total"]),
                            None if integrated else _mib(row["memory_free"]),
                            row["compute_cap"] or soc_cc, row["driver"], "nvidia-smi"))
    if not gpus and jetson and jetson.soc in known.JETSON_SOCS:
        name, cc = known.JETSON_SOCS[jetson.soc]
        gpus.append(GpuInfo(name, "nvidia", ("cuda",), True, True, compute_capability=cc,
                            detected_by="/proc/device-tree/compatible"))
    return gpus


def parse_vulkaninfo(text: str) -> list[dict[str, str]]:
    """``vulkaninfo --summary`` -> one dict per "GPUn:" section of its Devices list."""
    devices: list[dict[str, str]] = []
    for line in text.splitlines():
        if re.match(r"^GPU\d+:\s*$", line.strip()):
            devices.append({})
        elif devices and "=" in line:
            key, _, value = line.partition("=")
            devices[-1][key.strip()] = value.strip()
    return devices


def _vulkan(host: Host) -> list[GpuInfo]:
    gpus = []
    for dev in parse_vulkaninfo(host.r.command("vulkaninfo") or ""):
        kind = dev.get("deviceType", "")
        if kind not in VULKAN_TYPES:
            continue   # PHYSICAL_DEVICE_TYPE_CPU: a software rasteriser such as llvmpipe
        vendor_id = dev.get("vendorID", "0")
        vendor = known.GPU_VENDORS.get(int(vendor_id, 16) if vendor_id.startswith("0x") else 0, "")
        integrated = VULKAN_TYPES[kind]
        gpus.append(GpuInfo(dev.get("deviceName", "Vulkan device"), vendor, ("vulkan",), integrated, integrated,
                            driver=dev.get("driverInfo", dev.get("driverVersion", "")), detected_by="vulkaninfo"))
    return gpus


def _apple(host: Host) -> list[GpuInfo]:
    brand = host.sysctl.get("machdep.cpu.brand_string", "")
    if host.system != "darwin" or not brand.startswith("Apple"):
        return []
    return [GpuInfo(f"{brand} GPU", "apple", ("metal",), True, True, detected_by="sysctl machdep.cpu.brand_string")]


def _android(host: Host) -> list[GpuInfo]:
    if host.system != "android":
        return []
    soc = known.ANDROID_SOCS.get(host.props.get("ro.soc.model", ""))
    name = soc.gpu if soc else host.props.get("ro.hardware.vulkan", "")
    if not name:
        return []
    apis = []
    if any(n.startswith("vulkan.") for n in host.r.listing("/vendor/lib64/hw")):
        apis.append("vulkan")
    if "libOpenCL.so" in host.r.listing("/vendor/lib64"):
        apis.append("opencl")
    vendor = "qualcomm" if soc else ""
    return [GpuInfo(name, vendor, tuple(apis), True, True, detected_by="getprop ro.soc.model; /vendor/lib64")]


def merge(found: list[GpuInfo], extra: list[GpuInfo]) -> list[GpuInfo]:
    """Add ``extra`` devices; one of a vendor already found adds its APIs to that GPU instead (same device)."""
    gpus = list(found)
    for gpu in extra:
        same = next((i for i, g in enumerate(gpus) if g.vendor and g.vendor == gpu.vendor), None)
        if same is None:
            gpus.append(gpu)
            continue
        apis = gpus[same].apis + tuple(a for a in gpu.apis if a not in gpus[same].apis)
        gpus[same] = dataclasses.replace(gpus[same], apis=apis)
    return gpus


def detect(host: Host, board: BoardInfo) -> tuple[GpuInfo, ...]:
    """Every GPU found; missing tools (no nvidia-smi, no vulkaninfo) simply find nothing."""
    gpus = _nvidia(host, board) + _apple(host) + _android(host)
    return tuple(merge(gpus, _vulkan(host)))
