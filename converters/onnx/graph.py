"""A small ONNX graph builder that streams weights to one external data file as the graph grows.

Every weight is written the moment it is added: ``GraphBuilder.weight`` appends its bytes to
``model.onnx.data`` and keeps only a ``TensorProto`` that points at them (location, offset, length), so
the ModelProto never holds weight bytes and memory stays at about one tensor. Large tensors start on a
64 KiB boundary so ONNX Runtime can memory-map them in place. Small constants (shapes, axes, scalars)
are stored inline and de-duplicated. Names follow ONNX Runtime GenAI's builder: nodes are
``/model/layers.{i}/attn/q_proj/MatMul``, their outputs ``{node}/output_{k}``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 21                       # DequantizeLinear with block_size (uint4) needs 21; ORT 1.18+ runs it
MS_DOMAIN = "com.microsoft"
ALIGN_SMALL = 64                 # every tensor starts 64-byte aligned (SIMD loads)
ALIGN_LARGE = 1 << 16            # tensors of LARGE_TENSOR bytes or more: Windows' mmap granularity (64 KiB)
LARGE_TENSOR = 1 << 20

# numpy dtype -> ONNX element type (uint4 has no numpy dtype: see ``weight(..., uint4=True)``)
ELEMENT_TYPES = {np.dtype(k): v for k, v in ((np.float32, TensorProto.FLOAT), (np.float16, TensorProto.FLOAT16),
                                              (np.uint8, TensorProto.UINT8), (np.int8, TensorProto.INT8),
                                              (np.int32, TensorProto.INT32), (np.int64, TensorProto.INT64),
                                              (np.bool_, TensorProto.BOOL))}


class ExternalData:
    """Appends tensor bytes to one file and describes where each landed."""

    def __init__(self, path: Path, location: str) -> None:
        self.path, self.location = Path(path), location
        self._file = open(self.path, "wb")
        self.offset = 0

    def _align(self, nbytes: int) -> None:
        align = ALIGN_LARGE if nbytes >= LARGE_TENSOR else ALIGN_SMALL
        pad = -self.offset % align
        if pad:
            self._file.write(b"\0" * pad)
            self.offset += pad

    def write(self, name: str, shape: Sequence[int], elem_type: int, chunks: Iterable[np.ndarray],
              nbytes: int) -> TensorProto:
        """Write ``chunks`` (C-ordered pieces of one tensor, ``nbytes`` in total) as tensor ``name``."""
        self._align(nbytes)
        start, written = self.offset, 0
        for chunk in chunks:
            data = np.ascontiguousarray(chunk)
            self._file.write(memoryview(data).cast("B"))
            written += data.nbytes
        if written != nbytes:
            raise AssertionError(f"{name}: expected {nbytes} bytes, wrote {written}")
        self.offset += written
        tensor = TensorProto(name=name, dims=list(shape), data_type=elem_type)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(start)), ("length", str(nbytes))):
            tensor.external_data.add(key=key, value=value)
        return tensor

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


class GraphBuilder:
    """Nodes, graph inputs/outputs, inline constants and external weights of one ONNX graph."""

    def __init__(self, data: ExternalData) -> None:
        self.data = data
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[TensorProto] = []
        self._constants: dict[tuple, str] = {}
        self.weight_bytes = 0           # bytes of weights derived from the checkpoint
        self.n_params = 0               # their elements as stored (a packed byte of int4 codes counts once)
        self.op_counts: dict[str, int] = {}

    # --- nodes ---

    def node(self, op: str, inputs: Sequence[str], name: str, n_out: int = 1, domain: str = "",
             outputs: Sequence[str] | None = None, **attrs) -> list[str]:
        """Add node ``name`` (op ``op``); returns its output names: ``outputs`` where given (graph outputs
        written in place, e.g. a KV cache that must not be copied), else ``{name}/output_{k}``. An empty
        name leaves an optional output unused."""
        outputs = list(outputs) if outputs is not None else [f"{name}/output_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outputs, name=name, domain=domain or None,
                                           **{k: v for k, v in attrs.items() if v is not None}))
        key = f"{domain}.{op}" if domain else op
        self.op_counts[key] = self.op_counts.get(key, 0) + 1
        return outputs

    def op(self, op: str, inputs: Sequence[str], name: str, domain: str = "", **attrs) -> str:
        """A one-output node; returns that output's name."""
        return self.node(op, inputs, name, 1, domain, **attrs)[0]

    # --- values ---

    def constant(self, value, dtype) -> str:
        """An inline initializer holding ``value`` (shared by every use), named like ORT GenAI's constants."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            label = "_".join(str(v) for v in array.reshape(-1)[:8]) if array.size <= 8 else f"{len(self._constants)}"
            name = f"/model/constants/{array.dtype.name}/{list(array.shape)}/{label}"
            self.initializers.append(onnx.numpy_helper.from_array(array, name))
            self._constants[key] = name
        return self._constants[key]

    def weight(self, name: str, array: np.ndarray, *, uint4: bool = False, logical_shape: Sequence[int] = (),
               model_weight: bool = True) -> str:
        """Stream ``array`` to the external data file as initializer ``name``; returns ``name``.

        With ``uint4``, ``array`` holds packed nibbles (two values a byte, the first in the low nibble) of a
        tensor of ``logical_shape``. ``model_weight=False`` (computed tables such as RoPE caches) keeps the
        tensor out of ``weight_bytes``/``n_params``.
        """
        shape = list(logical_shape) if uint4 else list(array.shape)
        elem = TensorProto.UINT4 if uint4 else ELEMENT_TYPES[np.dtype(array.dtype)]
        return self.weight_chunks(name, shape, elem, [array], array.nbytes, model_weight=model_weight)

    def weight_chunks(self, name: str, shape: Sequence[int], elem_type: int, chunks: Iterable[np.ndarray],
                      nbytes: int, *, model_weight: bool = True) -> str:
        """Like ``weight`` for a tensor produced in C-ordered pieces (bounded memory for large matrices)."""
        self.initializers.append(self.data.write(name, shape, elem_type, chunks, nbytes))
        if model_weight:
            self.weight_bytes += nbytes
            self.n_params += int(np.prod(shape)) if shape else 1
        return name

    def input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def optional_input(self, name: str, default: np.ndarray) -> str:
        """A graph input that has a default value (an initializer of the same name): callers may omit it."""
        array = np.asarray(default)
        self.inputs.append(helper.make_tensor_value_info(name, ELEMENT_TYPES[array.dtype], list(array.shape)))
        self.initializers.append(onnx.numpy_helper.from_array(array, name))
        return name

    def output(self, name: str, elem_type: int, shape: Sequence[int | str]) -> None:
        """Declare graph output ``name`` (a node must write a value of that name)."""
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    def model(self, producer_version: str, metadata: dict[str, str]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "main_graph", self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid(MS_DOMAIN, 1)],
                                  producer_name="edgellm", producer_version=producer_version)
        model.ir_version = 10               # opset 21 needs IR 10 (uint4)
        for key, value in metadata.items():
            model.metadata_props.add(key=key, value=value)
        return model
