"""``probe()``: run every detector over one root and assemble a MachineInfo."""

from __future__ import annotations

import logging

from edgellm.errors import UsageError
from edgellm.probe import bandwidth, cpu, gpu, memory, npu, runtimes, system
from edgellm.probe.choose import Facts, choose_gguf, choose_onnx
from edgellm.probe.info import CpuInfo, GpuInfo, MachineInfo
from edgellm.probe.root import LiveRoot, Root

log = logging.getLogger(__name__)

METAL_BUDGET_NOTE = ("Metal may allocate about 65-75% of RAM by default (recommendedMaxWorkingSetSize); "
                     "`sudo sysctl iogpu.wired_limit_mb=N` raises it")


def _notes(system_name: str, cpu_info: CpuInfo, gpus: tuple[GpuInfo, ...]) -> tuple[str, ...]:
    """Things a reader of the report should know that no single field says."""
    notes = []
    for g in gpus:
        if g.unified_memory:
            notes.append(f"{g.name} shares host RAM (unified memory): budget models against available RAM")
        if g.vendor == "nvidia" and g.integrated and g.detected_by == "nvidia-smi":
            notes.append("nvidia-smi reports no GPU memory on Jetson ([N/A]); that is expected")
    if any(g.vendor == "apple" for g in gpus):
        notes.append(METAL_BUDGET_NOTE)
    if any(c.max_freq_hz is None for c in cpu_info.clusters):
        where = "macOS does not publish core clocks" if system_name == "darwin" else "no cpufreq in sysfs"
        notes.append(f"core clocks unknown ({where})")
    return tuple(notes)


def probe(root: Root | None = None, measure: bool = False) -> MachineInfo:
    """Probe a machine: this one (``root`` None) or a recorded one (``FixtureRoot``).

    ``measure`` times a numpy copy to measure memory bandwidth (under 2 s); otherwise it is estimated.

    Raises:
        ProbeError: when an essential source (/proc/cpuinfo, /proc/meminfo, sysctl) cannot be read.
        UsageError: when asked to measure a recorded root (a measurement is of this machine only).
    """
    if measure and root is not None and not isinstance(root, LiveRoot):
        raise UsageError("measuring bandwidth times this machine; it cannot be combined with a recorded root",
                         "drop --measure, or probe this machine without --root")
    host = system.open_host(root or LiveRoot())
    board = system.detect_board(host)
    cpu_info = cpu.detect(host)
    mem = memory.detect(host)
    gpus = gpu.detect(host, board)
    npus = npu.detect(host)
    llama = runtimes.llama_cpp(host.r.root)
    ort = runtimes.onnxruntime(host.r.root)
    facts = Facts(host.system, cpu_info, gpus, npus, llama, ort)
    device_class, class_reason = system.device_class(host, board)
    bw = bandwidth.measure(mem.available) if measure else bandwidth.estimate(host.system, board, cpu_info)
    info = MachineInfo(system.detect_os(host), board, cpu_info, mem, gpus, npus, llama, ort,
                       choose_gguf(facts), choose_onnx(facts), bw, device_class, class_reason,
                       dict(host.r.commands), _notes(host.system, cpu_info, gpus))
    log.info("probe: %s, %s; gguf -> %s, onnx -> %s", info.os.name, cpu_info.model, info.gguf.backend,
             info.onnx.backend)
    return info
