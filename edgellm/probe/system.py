"""The operating system, the board (Jetson module, SBC, Mac model, phone) and the device class."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from edgellm.errors import ProbeError
from edgellm.probe import known
from edgellm.probe.info import BoardInfo, JetsonInfo, OsInfo
from edgellm.probe.root import Reader, Root

SUPPORTED_SYSTEMS = ("linux", "darwin")


@dataclass
class Host:
    """A root plus the answers several detectors share, read once."""
    r: Reader
    system: str                   # "linux", "android" or "darwin"
    machine: str                  # uname machine
    release: str
    cpuinfo: str = ""             # /proc/cpuinfo on Linux and Android
    sysctl: dict[str, str] = field(default_factory=dict)   # macOS
    props: dict[str, str] = field(default_factory=dict)    # Android getprop


def parse_sysctl(text: str) -> dict[str, str]:
    """``sysctl`` output ("hw.memsize: 8589934592" per line) -> {key: value}."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


_PROP = re.compile(r"^\[([^\]]+)\]: \[(.*)\]$")


def parse_getprop(text: str) -> dict[str, str]:
    """Android ``getprop`` output ("[ro.soc.model]: [SM8650]" per line) -> {key: value}."""
    return {m.group(1): m.group(2) for m in map(_PROP.match, text.splitlines()) if m}


def open_host(root: Root) -> Host:
    """Read what every detector needs: uname, and /proc/cpuinfo + getprop (Linux) or sysctl (macOS).

    Raises:
        ProbeError: on an unsupported system, or when /proc/cpuinfo or sysctl cannot be read.
    """
    r = Reader(root)
    uname = root.uname()
    system = uname.get("system", "").lower()
    if system not in SUPPORTED_SYSTEMS:
        raise ProbeError(what="this system", problem=f"{uname.get('system')!r} is not supported yet "
                                                       "(the probe reads Linux, Android and macOS)")
    host = Host(r, system, uname.get("machine", ""), uname.get("release", ""))
    if system == "darwin":
        out = r.command("sysctl")
        if out is None:
            raise ProbeError(what="sysctl", problem="the command is missing or failed")
        host.sysctl = parse_sysctl(out)
        return host
    host.cpuinfo = r.required("/proc/cpuinfo")
    host.props = parse_getprop(r.command("getprop") or "")
    if host.props.get("ro.build.version.release") or host.props.get("ro.build.version.sdk"):
        host.system = "android"
    return host


def _os_release_name(text: str) -> str:
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "PRETTY_NAME":
            return value.strip().strip('"')
    return ""


def detect_os(host: Host) -> OsInfo:
    """Name the OS release from the files each system keeps it in."""
    if host.system == "darwin":
        name = f"macOS {host.sysctl.get('kern.osproductversion', '')}".strip()
    elif host.system == "android":
        p = host.props
        name = f"Android {p.get('ro.build.version.release', '?')} (SDK {p.get('ro.build.version.sdk', '?')})"
    else:
        name = _os_release_name(host.r.text("/etc/os-release") or "") or "Linux"
    return OsInfo(host.system, name, host.release, host.machine)


_L4T = re.compile(r"#\s*(R\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)")
_MODULE = re.compile(r"p\d{4}-\d{4}")


def detect_jetson(r: Reader) -> JetsonInfo | None:
    """An NVIDIA Jetson from /etc/nv_tegra_release and the device tree; None on anything else."""
    release = r.text("/etc/nv_tegra_release") or ""
    compatible = [c for c in (r.text("/proc/device-tree/compatible") or "").split("\x00") if c]
    socs = [c.split(",", 1)[1] for c in compatible if c.startswith("nvidia,tegra")]
    if not release and not socs:
        return None
    match = _L4T.search(release)
    l4t = f"{match.group(1)}.{match.group(2)}" if match else ""
    jetpack = known.JETPACK_BY_L4T.get(match.group(1), "") if match else ""
    ids = [m for c in compatible for m in _MODULE.findall(c)]
    module = next((m for m in ids if m in known.JETSON_MODULES), "")
    name = known.JETSON_MODULES[module].name if module else r.value("/proc/device-tree/model")
    return JetsonInfo(l4t, jetpack, module, name, socs[0] if socs else "")


def _battery(host: Host) -> bool:
    if host.system == "darwin":
        return "InternalBattery" in (host.r.command("pmset") or "")
    supplies = host.r.listing("/sys/class/power_supply")
    return any(host.r.value(f"/sys/class/power_supply/{s}/type") == "Battery" for s in supplies)


def _chassis(r: Reader) -> str:
    code = r.value("/sys/class/dmi/id/chassis_type")
    return known.DMI_CHASSIS.get(int(code), (f"type {code}", ""))[0] if code.isdigit() else ""


def detect_board(host: Host) -> BoardInfo:
    """What kind of board this is, from the device tree, DMI, Android properties or sysctl."""
    r, battery = host.r, _battery(host)
    if host.system == "darwin":
        brand = host.sysctl.get("machdep.cpu.brand_string", "")
        return BoardInfo(host.sysctl.get("hw.model", ""), "Apple", brand if brand.startswith("Apple") else "",
                         "", battery, False)
    virtual = any("hypervisor" in line.split() for line in host.cpuinfo.splitlines() if line.startswith("flags"))
    if host.system == "android":
        p = host.props
        return BoardInfo(p.get("ro.product.model", ""), p.get("ro.product.manufacturer", ""),
                         p.get("ro.soc.model") or p.get("ro.board.platform", ""), "", battery, virtual)
    jetson = detect_jetson(r)
    model = r.value("/proc/device-tree/model") or r.value("/sys/class/dmi/id/product_name")
    vendor = r.value("/sys/class/dmi/id/sys_vendor") or ("NVIDIA" if jetson else "")
    return BoardInfo(model, vendor, jetson.soc if jetson else "", _chassis(r), battery, virtual, jetson)


def _rule_phone(host: Host, board: BoardInfo) -> tuple[str, str] | None:
    return ("phone", "Android device") if host.system == "android" else None


def _rule_jetson(host: Host, board: BoardInfo) -> tuple[str, str] | None:
    if board.jetson:
        j = board.jetson
        return "embedded", f"NVIDIA Jetson {j.module or j.soc} ({j.module_name}), L4T {j.l4t}, JetPack {j.jetpack}"
    return None


def _rule_sbc(host: Host, board: BoardInfo) -> tuple[str, str] | None:
    if host.system == "linux" and board.model and host.r.value("/proc/device-tree/model"):
        return "sbc", f"board described by a device tree: {board.model!r}"
    return None


def _rule_battery(host: Host, board: BoardInfo) -> tuple[str, str] | None:
    return ("laptop", "a battery is present") if board.battery else None


def _rule_chassis(host: Host, board: BoardInfo) -> tuple[str, str] | None:
    kind = next((c for n, c in known.DMI_CHASSIS.values() if n == board.chassis), "")
    return (kind, f"DMI chassis type {board.chassis!r}") if kind else None


def _rule_mac(host: Host, board: BoardInfo) -> tuple[str, str] | None:
    if host.system != "darwin":
        return None
    if board.model.startswith("MacBook"):
        return "laptop", f"Mac model {board.model}"
    return "desktop", f"Mac model {board.model!r} with no battery"


def _rule_vm(host: Host, board: BoardInfo) -> tuple[str, str] | None:
    return ("server", "virtual machine (hypervisor CPU flag): assumed a server") if board.virtual else None


# First rule that answers wins; each returns (device class, reason) or None. A battery comes before the device
# tree: Arm laptops boot with device trees too.
CLASS_RULES: tuple[Callable[[Host, BoardInfo], tuple[str, str] | None], ...] = (
    _rule_phone, _rule_jetson, _rule_battery, _rule_sbc, _rule_chassis, _rule_mac, _rule_vm,
)


def device_class(host: Host, board: BoardInfo) -> tuple[str, str]:
    """(device class, reason) from the first rule in CLASS_RULES that recognises the machine."""
    for rule in CLASS_RULES:
        answer = rule(host, board)
        if answer:
            return answer
    return "desktop", "nothing identifies the machine (no battery, DMI chassis or device tree): assumed a desktop"
