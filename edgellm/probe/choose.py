"""Which backend this machine would use for GGUF and for ONNX, and why (pure: reads no files).

Each format has a table of candidates in order of preference. Every candidate is judged on two things:
is the hardware there, and does the installed runtime have it. The first that passes wins; every
candidate before it and every usable one after it is recorded with its reason, so no fallback is silent.
When a runtime is not installed, the choice names what it would use once installed (``ready`` False).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from edgellm.backends import BACKENDS
from edgellm.probe import runtimes
from edgellm.probe.info import BackendChoice, Considered, CpuInfo, GpuInfo, LlamaCppInfo, NpuInfo, OnnxRuntimeInfo

PIP_REBUILD = "pip install --force-reinstall --no-cache-dir llama-cpp-python"


@dataclass(frozen=True)
class Facts:
    """The parts of the probe a choice depends on."""
    system: str
    cpu: CpuInfo
    gpus: tuple[GpuInfo, ...]
    npus: tuple[NpuInfo, ...]
    llama_cpp: LlamaCppInfo
    onnxruntime: OnnxRuntimeInfo


# --- GGUF (llama.cpp) -----------------------------------------------------------------------------

@dataclass(frozen=True)
class GgufRow:
    backend: str
    build_flag: str          # CMake flag that builds llama.cpp with this backend; "" for the CPU


GGUF_ROWS: tuple[GgufRow, ...] = (
    GgufRow("llama.cpp-cuda", "-DGGML_CUDA=on"),
    GgufRow("llama.cpp-metal", "-DGGML_METAL=on"),
    GgufRow("llama.cpp-vulkan", "-DGGML_VULKAN=on"),
    GgufRow("llama.cpp-cpu", ""),
)

GPU_API_NAMES = {"cuda": "NVIDIA GPU (CUDA)", "metal": "Apple GPU (Metal)", "vulkan": "Vulkan GPU"}

# CPU features worth naming in a reason, in the order they are named
CPU_SUMMARY: tuple[tuple[str, str], ...] = (
    ("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX512-VNNI"),
    ("avx_vnni", "AVX-VNNI"), ("amx_int8", "AMX-INT8"), ("asimd", "NEON"), ("dotprod", "dotprod"),
    ("i8mm", "i8mm"), ("sve", "SVE"), ("sme", "SME"),
)

# Probe feature name -> the name ggml's CPU backend reports for the same instructions
GGML_CPU_FEATURES: dict[str, str] = {
    "sse3": "SSE3", "ssse3": "SSSE3", "avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C",
    "bmi2": "BMI2", "avx_vnni": "AVX_VNNI", "avx512f": "AVX512", "avx512_vnni": "AVX512_VNNI",
    "avx512_bf16": "AVX512_BF16", "amx_int8": "AMX_INT8", "asimd": "NEON", "fp16": "FP16_VA",
    "dotprod": "DOTPROD", "i8mm": "MATMUL_INT8", "sve": "SVE", "sme": "SME",
}


def _api(row: GgufRow) -> str:
    return BACKENDS[row.backend].api


def _rebuild_hint(row: GgufRow, gpu: GpuInfo) -> str:
    flags = row.build_flag
    if _api(row) == "cuda" and gpu.compute_capability:
        flags += f" -DCMAKE_CUDA_ARCHITECTURES={gpu.compute_capability.replace('.', '')}"
    return f'CMAKE_ARGS="{flags}" {PIP_REBUILD}'


def _cuda_arch_warning(facts: Facts, gpu: GpuInfo) -> str:
    # ggml reports __CUDA_ARCH_LIST__ (e.g. "500,610,870"): compute capability 8.7 is "870"
    archs = facts.llama_cpp.registries.get("CUDA", {}).get("ARCHS", "")
    wanted = gpu.compute_capability.replace(".", "") + "0" if gpu.compute_capability else ""
    if not archs or not wanted or wanted in archs.split(","):
        return ""
    return (f"; warning: built for CUDA archs {archs}, this GPU is sm_{wanted[:-1]}: kernels may fail to load, "
            f"rebuild with -DCMAKE_CUDA_ARCHITECTURES={wanted[:-1]}")


def _gguf_gpu(row: GgufRow, facts: Facts) -> Considered:
    api = _api(row)
    gpu = next((g for g in facts.gpus if api in g.apis), None)
    if gpu is None:
        return Considered(row.backend, False, False, f"no {GPU_API_NAMES[api]} found")
    llama = facts.llama_cpp
    if not llama.installed:
        return Considered(row.backend, False, True, f"{gpu.name} found but llama-cpp-python is not installed",
                          _rebuild_hint(row, gpu))
    if not llama.gpu_offload:
        return Considered(row.backend, False, True,
                          f"llama.cpp in this environment was built without GPU offload ({gpu.name} unused)",
                          _rebuild_hint(row, gpu))
    built = runtimes.gpu_apis(llama)
    if api in built:
        details = " | ".join(f"{k} = {v}" for k, v in llama.registries.get(_registry(llama, api), {}).items())
        warning = _cuda_arch_warning(facts, gpu) if api == "cuda" else ""
        return Considered(row.backend, True, True, f"{gpu.name}; llama.cpp was built with {api.upper()}"
                          + (f" ({details})" if details else "") + warning)
    if api == "vulkan" and not built:
        return Considered(row.backend, True, True, f"{gpu.name}; llama.cpp has GPU offload and names no other GPU "
                          "backend (Vulkan builds do not list themselves in system info)")
    return Considered(row.backend, False, True,
                      f"llama.cpp was built for {', '.join(sorted(built))}, not {api} ({gpu.name} unused)",
                      _rebuild_hint(row, gpu))


def _registry(llama: LlamaCppInfo, api: str) -> str:
    return next((n for n in llama.registries if runtimes.GPU_REGISTRIES.get(n) == api), "")


def cpu_summary(cpu: CpuInfo) -> str:
    """"CPU has AVX2+FMA" / "CPU has NEON+dotprod+i8mm" from the features llama.cpp's kernels use."""
    names = [label for feature, label in CPU_SUMMARY if feature in cpu.features]
    if not names:
        return "CPU has no AVX2 or NEON: llama.cpp falls back to slow generic kernels"
    return f"CPU has {'+'.join(names)}"


def build_vs_cpu(facts: Facts) -> list[str]:
    """Differences between the CPU's features and those the llama.cpp build uses, as sentences."""
    cpu_regs = facts.llama_cpp.registries.get("CPU")
    if not cpu_regs:
        return []
    built = runtimes.enabled(cpu_regs)
    have = {GGML_CPU_FEATURES[f] for f in facts.cpu.features if f in GGML_CPU_FEATURES}
    unused = sorted(have - built)
    missing = sorted(built & set(GGML_CPU_FEATURES.values()) - have)
    notes = []
    if unused:
        notes.append(f"this llama.cpp build does not use {'+'.join(unused)} (the CPU has it; "
                     "a build with -DGGML_NATIVE=on would)")
    if missing:
        notes.append(f"this llama.cpp build uses {'+'.join(missing)}, which this CPU lacks: "
                     "expect 'illegal instruction' crashes")
    return notes


def _gguf_cpu(facts: Facts, gpu_rows: list[Considered]) -> Considered:
    if not facts.llama_cpp.installed:
        why = "llama-cpp-python is not installed"
    else:
        blocked = next((c for c in gpu_rows if c.hardware and not c.usable), None)
        why = blocked.reason if blocked else "no GPU that llama.cpp can use was found"
    reason = "; ".join([why, cpu_summary(facts.cpu), *build_vs_cpu(facts)])
    return Considered("llama.cpp-cpu", True, True, reason, "" if facts.llama_cpp.installed else
                      "pip install llama-cpp-python")


def choose_gguf(facts: Facts) -> BackendChoice:
    """The llama.cpp backend for GGUF models, with the verdict on every candidate."""
    gpu_rows = [_gguf_gpu(row, facts) for row in GGUF_ROWS if row.build_flag]
    considered = tuple(gpu_rows) + (_gguf_cpu(facts, gpu_rows),)
    ready = facts.llama_cpp.installed
    if ready:
        chosen = next(c for c in considered if c.usable)
        return BackendChoice("gguf", chosen.backend, chosen.reason, True, considered)
    chosen = next(c for c in considered if c.hardware)
    hint = f" (install: {chosen.hint})" if chosen.hint else ""
    return BackendChoice("gguf", chosen.backend, f"llama-cpp-python is not installed; on this hardware it would "
                         f"use {chosen.backend}{hint}", False, considered)


# --- ONNX (ONNX Runtime execution providers) -------------------------------------------------------

@dataclass(frozen=True)
class OnnxRow:
    backend: str
    needs: str               # key in HARDWARE
    package: str             # what to pip install to get the provider
    caveat: str = ""         # why a usable provider still ranks after the CPU


# The rows after onnxruntime-cpu need a model exported for them: edgellm writes CPU/CUDA graphs with
# contrib ops (MatMulNBits, GroupQueryAttention) that these providers do not run as they are.
ONNX_ROWS: tuple[OnnxRow, ...] = (
    OnnxRow("onnxruntime-cuda", "nvidia", "onnxruntime-gpu"),
    OnnxRow("onnxruntime-tensorrt", "nvidia", "onnxruntime-gpu with TensorRT"),
    OnnxRow("onnxruntime-dml", "windows", "onnxruntime-directml"),
    OnnxRow("onnxruntime-cpu", "any", "onnxruntime"),
    OnnxRow("onnxruntime-openvino", "intel", "onnxruntime-openvino",
            "OpenVINO needs a model exported for it (static shapes on the NPU)"),
    OnnxRow("onnxruntime-qnn", "hexagon", "onnxruntime-qnn",
            "QNN needs a context binary compiled for this SoC (Qualcomm AI Hub / QAIRT)"),
    OnnxRow("onnxruntime-coreml", "apple", "onnxruntime",
            "Core ML cannot run the contrib ops LLM graphs use, so they would fall back to the CPU"),
)


def _nvidia(f: Facts) -> str | None:
    return next((g.name for g in f.gpus if "cuda" in g.apis), None)


def _intel(f: Facts) -> str | None:
    found = [n.detail for n in f.npus if n.vendor == "intel"] + [g.name for g in f.gpus if g.vendor == "intel"]
    if f.cpu.vendor == "GenuineIntel":
        found.insert(0, f.cpu.model)
    return ", ".join(found) or None


# requirement -> (finder returning what satisfies it or None, sentence when nothing does)
HARDWARE: dict[str, tuple[Callable[[Facts], str | None], str]] = {
    "nvidia": (_nvidia, "no NVIDIA GPU found"),
    "windows": (lambda f: None, "DirectML runs only on Windows"),
    "any": (lambda f: f.cpu.model or "the CPU", ""),
    "intel": (_intel, "no Intel CPU, GPU or NPU found"),
    "hexagon": (lambda f: next((n.detail for n in f.npus if n.api == "qnn"), None), "no Qualcomm Hexagon NPU found"),
    "apple": (lambda f: next((n.detail for n in f.npus if n.api == "coreml"), None), "not an Apple silicon Mac"),
}


def _install_hint(row: OnnxRow, facts: Facts) -> str:
    if row.needs == "nvidia" and facts.cpu.arch == "aarch64":
        return "install the Jetson Zoo onnxruntime-gpu wheel (PyPI has no aarch64 CUDA wheels)"
    return f"pip install {row.package}"


def _onnx_row(row: OnnxRow, facts: Facts) -> Considered:
    finder, absent = HARDWARE[row.needs]
    found = finder(facts)
    if found is None:
        return Considered(row.backend, False, False, absent)
    provider = BACKENDS[row.backend].ort_provider
    ort = facts.onnxruntime
    if not ort.installed:
        return Considered(row.backend, False, True, f"{found} found but onnxruntime is not installed",
                          _install_hint(row, facts))
    if provider not in ort.providers:
        return Considered(row.backend, False, True, f"{provider} is not in this onnxruntime build "
                          f"(it has {', '.join(ort.providers) or 'none'})", _install_hint(row, facts))
    caveat = f"; {row.caveat}" if row.caveat else ""
    return Considered(row.backend, True, True, f"{provider} on {found}{caveat}")


def _onnx_reason(chosen: Considered, considered: tuple[Considered, ...]) -> str:
    index = considered.index(chosen)
    parts = [chosen.reason]
    parts += [f"fell back from {c.backend}: {c.reason}" + (f" ({c.hint})" if c.hint else "")
              for c in considered[:index] if c.hardware]
    parts += [f"{c.backend} is also available but ranks lower" for c in considered[index + 1:] if c.usable]
    return "; ".join(parts)


def choose_onnx(facts: Facts) -> BackendChoice:
    """The ONNX Runtime execution provider for ONNX models, with the verdict on every candidate."""
    considered = tuple(_onnx_row(row, facts) for row in ONNX_ROWS)
    if facts.onnxruntime.installed:
        cpu = next(c for c in considered if c.backend == "onnxruntime-cpu")
        chosen = next((c for c in considered if c.usable), cpu)
        return BackendChoice("onnx", chosen.backend, _onnx_reason(chosen, considered), True, considered)
    chosen = next(c for c in considered if c.hardware)
    return BackendChoice("onnx", chosen.backend, f"onnxruntime is not installed; on this hardware it would use "
                         f"{chosen.backend} (install: {chosen.hint})", False, considered)
