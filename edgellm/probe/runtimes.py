"""What the installed runtimes were built with: llama.cpp's backends and CPU features, ONNX Runtime's providers."""

from __future__ import annotations

from edgellm.probe.info import LlamaCppInfo, OnnxRuntimeInfo
from edgellm.probe.root import Root

# llama.cpp registry names (as llama_print_system_info prints them) -> GPU API. Metal registers as "MTL".
# Vulkan's registry exposes no feature list, so a Vulkan build never shows up in system info.
GPU_REGISTRIES: dict[str, str] = {"CUDA": "cuda", "ROCm": "rocm", "MTL": "metal", "Metal": "metal",
                                  "Vulkan": "vulkan", "SYCL": "sycl", "OpenCL": "opencl", "CANN": "cann"}


def parse_system_info(text: str) -> dict[str, dict[str, str]]:
    """``llama_print_system_info()`` -> {registry: {feature: value}}.

    Current builds print "CPU : AVX2 = 1 | ... | CUDA : ARCHS = 870 | ..." and list only features that are
    on; older builds printed one flat list with 0/1 values, which is filed under "CPU" here.
    """
    registries: dict[str, dict[str, str]] = {}
    current = "CPU"
    for item in text.split("|"):
        item = item.strip()
        if " : " in item:
            current, _, item = item.partition(" : ")
            current = current.strip()
            registries.setdefault(current, {})
        name, sep, value = item.partition("=")
        if sep and name.strip():
            registries.setdefault(current, {})[name.strip()] = value.strip()
    return registries


def enabled(features: dict[str, str]) -> set[str]:
    """Feature names that are on (old builds list switched-off features with value 0)."""
    return {k for k, v in features.items() if v != "0"}


def gpu_apis(info: LlamaCppInfo) -> set[str]:
    """GPU APIs the llama.cpp build names in its system info."""
    return {GPU_REGISTRIES[name] for name in info.registries if name in GPU_REGISTRIES}


def llama_cpp(root: Root) -> LlamaCppInfo:
    """llama.cpp as llama-cpp-python was built here; ``installed`` False when it cannot be imported."""
    answer = root.llama_cpp_info()
    if answer is None:
        return LlamaCppInfo(False)
    text = str(answer.get("system_info", ""))
    return LlamaCppInfo(True, str(answer.get("version", "")), bool(answer.get("gpu_offload")),
                        parse_system_info(text), text.strip())


def onnxruntime(root: Root) -> OnnxRuntimeInfo:
    """ONNX Runtime's compiled-in execution providers; ``installed`` False when it cannot be imported."""
    answer = root.ort_info()
    if answer is None:
        return OnnxRuntimeInfo(False)
    return OnnxRuntimeInfo(True, str(answer.get("version", "")), tuple(answer.get("providers", ())))
