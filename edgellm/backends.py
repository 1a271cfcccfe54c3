"""The table of inference backends edgellm knows: one row per (engine, device API).

Device profiles list backends by these ids in order of preference; the probe says which of them this
machine can use. ``ort_provider`` is ONNX Runtime's execution-provider name for the ONNX rows.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    id: str
    format: str               # model file format the backend runs: "gguf" or "onnx"
    engine: str               # "llama.cpp" or "onnxruntime"
    device: str               # "cpu", "gpu" or "npu"
    api: str                  # "cpu", "cuda", "metal", "vulkan", "tensorrt", "qnn", "coreml", "openvino", "dml"
    ort_provider: str | None = None


BACKENDS: dict[str, Backend] = {b.id: b for b in (
    Backend("llama.cpp-cpu", "gguf", "llama.cpp", "cpu", "cpu"),
    Backend("llama.cpp-cuda", "gguf", "llama.cpp", "gpu", "cuda"),
    Backend("llama.cpp-metal", "gguf", "llama.cpp", "gpu", "metal"),
    Backend("llama.cpp-vulkan", "gguf", "llama.cpp", "gpu", "vulkan"),
    Backend("onnxruntime-cpu", "onnx", "onnxruntime", "cpu", "cpu", "CPUExecutionProvider"),
    Backend("onnxruntime-cuda", "onnx", "onnxruntime", "gpu", "cuda", "CUDAExecutionProvider"),
    Backend("onnxruntime-tensorrt", "onnx", "onnxruntime", "gpu", "tensorrt", "TensorrtExecutionProvider"),
    Backend("onnxruntime-dml", "onnx", "onnxruntime", "gpu", "dml", "DmlExecutionProvider"),
    Backend("onnxruntime-coreml", "onnx", "onnxruntime", "npu", "coreml", "CoreMLExecutionProvider"),
    Backend("onnxruntime-qnn", "onnx", "onnxruntime", "npu", "qnn", "QNNExecutionProvider"),
    Backend("onnxruntime-openvino", "onnx", "onnxruntime", "npu", "openvino", "OpenVINOExecutionProvider"),
)}

BY_ORT_PROVIDER: dict[str, Backend] = {b.ort_provider: b for b in BACKENDS.values() if b.ort_provider}
