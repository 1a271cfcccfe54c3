"""``edgellm probe``: what this machine has and which backends it would use (``--json`` for everything)."""

from __future__ import annotations

import argparse

from edgellm.cli.output import print_json
from edgellm.probe import FixtureRoot, GpuInfo, MachineInfo, probe
from edgellm.units import format_bytes

LABEL_WIDTH = 12


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("probe", help="report this machine's CPU, memory, GPUs, NPUs and backend choices",
                              description="Probe this machine's hardware and the installed runtimes; name the "
                                          "backend it would use for GGUF and for ONNX models, and why.")
    p.add_argument("--json", action="store_true", help="print every detail as JSON")
    p.add_argument("--measure", action="store_true", help="measure memory bandwidth (numpy copy, under 2 s)")
    p.add_argument("--root", metavar="DIR", help="read a recorded device tree instead of this machine "
                                                 "(see tests/fixtures/probe)")
    p.set_defaults(run=run)


def _clock(hz: float | None) -> str:
    return f"{hz / 1e9:.2f} GHz" if hz else "clock unknown"


def _cpu_lines(info: MachineInfo) -> list[tuple[str, str]]:
    cpu = info.cpu
    clusters = ", ".join(f"{c.physical_cores}x {c.core} ({_clock(c.max_freq_hz)})" for c in cpu.clusters)
    return [("CPU", f"{cpu.model} ({cpu.arch}), {cpu.physical_cores} cores, {cpu.logical_cores} threads"),
            ("  clusters", clusters), ("  features", " ".join(cpu.features) or "none known")]


def _gpu_memory(g: GpuInfo) -> str:
    if g.memory_total:
        return f", {format_bytes(g.memory_total)}"
    return ", unified memory" if g.unified_memory else ""


def _device_lines(info: MachineInfo) -> list[tuple[str, str]]:
    gpus = [f"{g.name} [{', '.join(g.apis) or 'no API'}]{_gpu_memory(g)}" for g in info.gpus]
    npus = [f"{n.name} ({n.detail})" for n in info.npus]
    return [("GPUs", "; ".join(gpus) or "none"), ("NPUs", "; ".join(npus) or "none")]


def _runtime_lines(info: MachineInfo) -> list[tuple[str, str]]:
    llama, ort = info.llama_cpp, info.onnxruntime
    llama_text = "not installed"
    if llama.installed:
        regs = ", ".join(llama.registries) or "no backends listed"
        llama_text = f"{llama.version}, GPU offload {'yes' if llama.gpu_offload else 'no'}, backends: {regs}"
    ort_text = f"{ort.version}: {', '.join(ort.providers)}" if ort.installed else "not installed"
    return [("llama.cpp", llama_text), ("onnxruntime", ort_text)]


def render(info: MachineInfo) -> str:
    """A short human-readable report; the JSON form carries everything."""
    mem, bw = info.memory, info.bandwidth
    how = "measured" if bw.measured else "estimated"
    rows = [
        ("OS", f"{info.os.name} ({info.os.system} {info.os.kernel}, {info.os.machine})"),
        ("Device", f"{info.device_class}" + (f", {info.board.model}" if info.board.model else "")
         + f" ({info.device_class_reason})"),
        *_cpu_lines(info),
        ("Memory", f"{format_bytes(mem.total)} total, {format_bytes(mem.available)} available, "
                   f"swap {format_bytes(mem.swap_total)}"),
        ("Bandwidth", f"{bw.bytes_per_s / 1e9:.1f} GB/s {how} ({bw.basis})"),
        *_device_lines(info),
        *_runtime_lines(info),
        ("GGUF ->", f"{info.gguf.backend}: {info.gguf.reason}"),
        ("ONNX ->", f"{info.onnx.backend}: {info.onnx.reason}"),
        *(("note", n) for n in info.notes),
    ]
    return "\n".join(f"{label:<{LABEL_WIDTH}}{value}" for label, value in rows)


def run(args: argparse.Namespace) -> int:
    root = FixtureRoot(args.root) if args.root else None
    info = probe(root=root, measure=args.measure)
    if args.json:
        print_json(info.to_dict())
    else:
        print(render(info))
    return 0
