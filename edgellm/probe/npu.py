"""NPUs: Qualcomm Hexagon (QNN), Apple Neural Engine (Core ML), Intel NPU (OpenVINO, Linux intel_vpu)."""

from __future__ import annotations

from edgellm.probe import known
from edgellm.probe.info import NpuInfo
from edgellm.probe.system import Host

PCI_DEVICES = "/sys/bus/pci/devices"
NPU_PCI_CLASS = "0x120000"        # PCI class 12h: processing accelerator
INTEL_NPU_DRIVER = "intel_vpu"


def _hexagon(host: Host) -> list[NpuInfo]:
    model = host.props.get("ro.soc.model", "")
    soc = known.ANDROID_SOCS.get(model)
    if host.system != "android" or soc is None:
        return []
    return [NpuInfo("Qualcomm Hexagon NPU", "qualcomm", "qnn", f"{soc.name} ({model}), HTP {soc.htp}",
                    "getprop ro.soc.model")]


def _apple_ane(host: Host) -> list[NpuInfo]:
    brand = host.sysctl.get("machdep.cpu.brand_string", "")
    if host.system != "darwin" or not brand.startswith("Apple"):
        return []
    return [NpuInfo("Apple Neural Engine", "apple", "coreml", brand, "sysctl machdep.cpu.brand_string")]


def _uevent(host: Host, device: str) -> dict[str, str]:
    text = host.r.text(f"{PCI_DEVICES}/{device}/uevent") or ""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _intel_npu(host: Host) -> list[NpuInfo]:
    if host.system != "linux":
        return []
    npus = []
    accel = [f"/dev/accel/{n}" for n in host.r.listing("/dev/accel")]
    for device in host.r.listing(PCI_DEVICES):
        if host.r.value(f"{PCI_DEVICES}/{device}/class") != NPU_PCI_CLASS:
            continue
        uevent = _uevent(host, device)
        vendor_id, _, device_id = uevent.get("PCI_ID", ":").lower().partition(":")
        if vendor_id != "8086":
            continue
        name = known.INTEL_NPUS.get(device_id, "Intel NPU")
        driver = uevent.get("DRIVER", "")
        if driver != INTEL_NPU_DRIVER:
            state = f"no {INTEL_NPU_DRIVER} driver bound (install the Linux NPU driver)"
        else:
            state = ", ".join(accel) if accel else "driver bound but no /dev/accel node"
        npus.append(NpuInfo("Intel NPU", "intel", "openvino", f"{name} (8086:{device_id}) at {device}: {state}",
                            f"{PCI_DEVICES}/{device}"))
    return npus


def detect(host: Host) -> tuple[NpuInfo, ...]:
    """Every NPU found, with how it was found and what it still needs."""
    return tuple(_hexagon(host) + _apple_ane(host) + _intel_npu(host))
