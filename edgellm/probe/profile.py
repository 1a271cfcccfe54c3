"""A DeviceProfile built from a probe (pure: the probe has already read everything)."""

from __future__ import annotations

from edgellm.probe import bandwidth
from edgellm.probe.info import MachineInfo
from edgellm.targets.schema import Accelerator, Cpu, CpuCluster, DeviceProfile, Memory, Source

LOCAL_ID = "local"
UNKNOWN_CLOCK_HZ = 0.0      # written for clusters whose top clock the OS does not report


def _clusters(info: MachineInfo) -> tuple[CpuCluster, ...]:
    return tuple(CpuCluster(c.core, c.physical_cores, c.max_freq_hz or UNKNOWN_CLOCK_HZ) for c in info.cpu.clusters)


def _accelerators(info: MachineInfo) -> tuple[Accelerator, ...]:
    gpus = tuple(Accelerator("gpu", g.name, g.apis[0] if g.apis else "", g.compute_capability,
                             memory=None if g.unified_memory else g.memory_total) for g in info.gpus)
    npus = tuple(Accelerator("npu", n.name, n.api) for n in info.npus)
    return gpus + npus


def _sources(info: MachineInfo) -> tuple[Source, ...]:
    bw = info.bandwidth
    title = f"measured on this machine: {bw.basis}" if bw.measured else f"estimated: {bw.basis}"
    sources = [
        Source(("cpu", "memory.total", "memory.usable", "accelerators", "backends"),
               f"probed on this machine ({info.os.name}); memory.usable is the RAM available at probe time"),
        Source(("memory.bandwidth",), title),
    ]
    if any(c.max_freq_hz is None for c in info.cpu.clusters):
        sources.append(Source(("cpu.clusters.max_clock",), "unknown: the OS does not report core clocks here; "
                                                           "written as 0 Hz"))
    return tuple(sources)


def _backends(info: MachineInfo) -> tuple[str, ...]:
    ordered = info.gguf.usable + info.onnx.usable
    return tuple(dict.fromkeys(ordered))


def build_profile(info: MachineInfo) -> DeviceProfile:
    """The profile ``local``: this machine's CPU, available RAM as usable memory, and the probe's backends."""
    memory_facts = bandwidth.known_memory(info.os.system, info.board)
    memory = Memory(info.memory.total, info.memory.available, info.bandwidth.bytes_per_s,
                    unified=any(g.unified_memory for g in info.gpus),
                    kind=memory_facts.kind if memory_facts else "")
    cpu = Cpu(info.cpu.arch, _clusters(info), info.cpu.features, info.cpu.model)
    name = f"{info.board.model or info.cpu.model} (this machine)"
    notes = (f"device class: {info.device_class_reason}. GGUF: {info.gguf.backend}: {info.gguf.reason}. "
             f"ONNX: {info.onnx.backend}: {info.onnx.reason}.")
    return DeviceProfile(LOCAL_ID, name, info.device_class, cpu, memory, _backends(info), _sources(info),
                         accelerators=_accelerators(info), notes=notes)
