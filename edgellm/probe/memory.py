"""RAM and swap: /proc/meminfo on Linux and Android; sysctl and vm_stat on macOS. All figures in bytes."""

from __future__ import annotations

import re

from edgellm.errors import ProbeError
from edgellm.probe.info import MemoryInfo
from edgellm.probe.system import Host

KIB = 1024
_SWAP_UNITS = {"K": KIB, "M": KIB**2, "G": KIB**3}


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo -> {field: bytes}; the kernel writes sizes in KiB ("kB")."""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (KIB if parts[1:] == ["kB"] else 1)
    return out


def detect_linux(host: Host) -> MemoryInfo:
    """Raises ProbeError when /proc/meminfo is unreadable or has no MemTotal."""
    info = parse_meminfo(host.r.required("/proc/meminfo"))
    if "MemTotal" not in info:
        raise ProbeError(what="/proc/meminfo", problem="no MemTotal line")
    # Kernels before 3.14 have no MemAvailable; free + page cache is the usual stand-in.
    available = info.get("MemAvailable", info.get("MemFree", 0) + info.get("Buffers", 0) + info.get("Cached", 0))
    return MemoryInfo(info["MemTotal"], available, info.get("SwapTotal", 0), info.get("SwapFree", 0))


def parse_vm_stat(text: str) -> int:
    """Bytes available from ``vm_stat``: free + inactive pages (psutil's definition of available on macOS)."""
    page = re.search(r"page size of (\d+) bytes", text)
    counts = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if value.strip().rstrip(".").isdigit():
            counts[key.strip()] = int(value.strip().rstrip("."))
    size = int(page.group(1)) if page else 4096
    return (counts.get("Pages free", 0) + counts.get("Pages inactive", 0)) * size


def parse_swapusage(text: str) -> tuple[int, int]:
    """sysctl vm.swapusage "total = 2048.00M  used = 1024.00M  free = 1024.00M" -> (total, free) bytes."""
    sizes = {k: float(v) * _SWAP_UNITS[u] for k, v, u in re.findall(r"(\w+) = ([0-9.]+)([KMG])", text)}
    return int(sizes.get("total", 0)), int(sizes.get("free", 0))


def detect_darwin(host: Host) -> MemoryInfo:
    """Raises ProbeError when sysctl has no hw.memsize or vm_stat does not answer."""
    total = host.sysctl.get("hw.memsize", "")
    if not total.isdigit():
        raise ProbeError(what="sysctl hw.memsize", problem="missing")
    vm_stat = host.r.command("vm_stat")
    if vm_stat is None:
        raise ProbeError(what="vm_stat", problem="the command is missing or failed, so available memory is unknown")
    available = parse_vm_stat(vm_stat)
    swap_total, swap_free = parse_swapusage(host.sysctl.get("vm.swapusage", ""))
    return MemoryInfo(int(total), min(available, int(total)), swap_total, swap_free)


def detect(host: Host) -> MemoryInfo:
    """RAM and swap of ``host``. Raises ProbeError when the essential source is unreadable."""
    return detect_darwin(host) if host.system == "darwin" else detect_linux(host)
