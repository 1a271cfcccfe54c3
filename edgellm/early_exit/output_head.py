"""The model's own output head, computed by ggml outside llama.cpp's graph, on hidden states the eval callback
handed out: the verifier of the shared draft (``shared.py``).

llama.cpp's output tensor (found through the graph: the weight operand of the ``result_output`` matrix product)
is used in place, in whatever buffer llama.cpp put it (memory-mapped file, or a repacked CPU buffer), and
multiplied by ggml's own CPU kernels: each row of logits is bit for bit what ``llama_decode`` returns for that
hidden state (tests check it), whether one row or several are computed at once. A copy of some of its rows
(a reduced-vocabulary head with the same numerics) is available where the tensor keeps ggml's plain layout.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import llama_cpp
import numpy as np

from edgellm.converters.imatrix import _Ggml, _GgmlTensor

GGML_TYPE_F32 = 0
WORK_BYTES = 1 << 22          # ggml context memory beyond the result: tensor/graph objects and the work buffer


class _InitParams(ctypes.Structure):
    """struct ggml_init_params (ggml.h)."""

    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@dataclass(frozen=True)
class _Compute:
    """libggml's graph functions and libggml-cpu's compute entry point, bound with ctypes."""

    base: ctypes.CDLL
    cpu: ctypes.CDLL
    mul_mat_op: int

    @classmethod
    def load(cls) -> "_Compute":
        ggml = _Ggml.load()
        base = ggml.lib
        cpu = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", _cpu_library_name()))
        voidp = ctypes.c_void_p
        for name, restype, argtypes in (
                ("ggml_init", voidp, [_InitParams]), ("ggml_free", None, [voidp]),
                ("ggml_new_tensor_2d", voidp, [voidp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
                ("ggml_mul_mat", voidp, [voidp, voidp, voidp]), ("ggml_new_graph", voidp, [voidp]),
                ("ggml_build_forward_expand", None, [voidp, voidp]), ("ggml_graph_overhead", ctypes.c_size_t, []),
                ("ggml_row_size", ctypes.c_size_t, [ctypes.c_int, ctypes.c_int64]),
                ("ggml_backend_buffer_name", ctypes.c_char_p, [voidp])):
            fn = getattr(base, name)
            fn.restype, fn.argtypes = restype, argtypes
        cpu.ggml_graph_compute_with_ctx.restype = ctypes.c_int
        cpu.ggml_graph_compute_with_ctx.argtypes = [voidp, voidp, ctypes.c_int]
        return cls(base, cpu, ggml.mul_mat)


def _cpu_library_name() -> str:
    folder = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    names = sorted(n for n in os.listdir(folder) if n.startswith("libggml-cpu") or n.startswith("ggml-cpu"))
    if not names:
        raise OSError(f"no ggml CPU library in {folder}")
    return names[0]


class OutputHead:
    """Logits of hidden states through a ggml weight tensor (n_embd columns, one row per output).

    ``weight`` is the address of a ``struct ggml_tensor`` that stays alive as long as this object is used
    (llama.cpp's, or one this object made over its own copy of some rows).
    """

    def __init__(self, compute: _Compute, weight: int, n_threads: int, *, keep: object = None,
                 vocab_ids: np.ndarray | None = None) -> None:
        self._c, self.weight, self.n_threads = compute, weight, max(1, int(n_threads))
        tensor = _GgmlTensor.from_address(weight)
        self.n_embd, self.n_rows, self.type = int(tensor.ne[0]), int(tensor.ne[1]), int(tensor.type)
        self.vocab_ids = vocab_ids                   # token id of each row (None: row i is token i)
        self._keep = keep                            # what owns the memory behind ``weight``

    @classmethod
    def from_graph(cls, output_node: int, n_threads: int) -> "OutputHead":
        """The head whose product is llama.cpp's ``result_output`` node (the address the eval callback saw).

        Raises ValueError when that node is not a plain matrix product of the weight and the hidden state (an
        architecture that scales or caps its logits) or the weight is not in host memory.
        """
        compute = _Compute.load()
        node = _GgmlTensor.from_address(output_node)
        if node.op != compute.mul_mat_op or not node.src[0]:
            raise ValueError("the output logits are not a plain matrix product of the final hidden state "
                             "(scaled or capped logits)")
        weight = _GgmlTensor.from_address(node.src[0])
        where = compute.base.ggml_backend_buffer_name(weight.buffer).decode() if weight.buffer else "no buffer"
        if not where.startswith("CPU"):          # CPU, CPU_Mapped, CPU_REPACK: host memory ggml-cpu computes with
            raise ValueError(f"the output matrix is not in CPU memory ({where})")
        return cls(compute, node.src[0], n_threads)

    @property
    def plain_layout(self) -> bool:
        """Whether the weight's bytes are ggml's standard rows (not repacked for a CPU extra buffer type)."""
        return not _GgmlTensor.from_address(self.weight).extra

    def subset(self, ids: np.ndarray) -> "OutputHead":
        """A head over rows ``ids`` only (a copy, same type: each logit is the same number the full head gives).

        Raises ValueError when the weight is repacked (its rows are interleaved)."""
        if not self.plain_layout:
            raise ValueError("the output matrix is repacked: its rows cannot be copied out")
        ids = np.asarray(ids, np.int64)
        row_bytes = int(self._c.base.ggml_row_size(self.type, self.n_embd))
        tensor = _GgmlTensor.from_address(self.weight)
        rows = np.ctypeslib.as_array((ctypes.c_uint8 * (row_bytes * self.n_rows)).from_address(tensor.data))
        picked = np.ascontiguousarray(rows.reshape(self.n_rows, row_bytes)[ids])
        ctx = self._c.base.ggml_init(_InitParams(4096, None, True))
        if not ctx:
            raise MemoryError("ggml_init failed")
        owner = _Owner(self._c, ctx, picked)
        weight = self._c.base.ggml_new_tensor_2d(ctx, self.type, self.n_embd, len(ids))
        _GgmlTensor.from_address(weight).data = picked.ctypes.data
        return OutputHead(self._c, weight, self.n_threads, keep=owner, vocab_ids=ids)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """(n, n_rows) float32 logits of (n, n_embd) hidden states, computed as one ggml matrix product."""
        h = np.ascontiguousarray(hidden, np.float32)
        n = h.shape[0]
        out = np.empty((n, self.n_rows), np.float32)
        base = self._c.base
        size = base.ggml_graph_overhead() + WORK_BYTES + h.nbytes * 2
        ctx = base.ggml_init(_InitParams(size, None, True))
        if not ctx:
            raise MemoryError("ggml_init failed")
        try:
            x = base.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, self.n_embd, n)
            _GgmlTensor.from_address(x).data = h.ctypes.data
            y = base.ggml_mul_mat(ctx, self.weight, x)
            _GgmlTensor.from_address(y).data = out.ctypes.data
            graph = base.ggml_new_graph(ctx)
            base.ggml_build_forward_expand(graph, y)
            status = self._c.cpu.ggml_graph_compute_with_ctx(ctx, graph, self.n_threads)
        finally:
            base.ggml_free(ctx)
        if status != 0:
            raise RuntimeError(f"ggml could not compute the output head (status {status})")
        return out


class _Owner:
    """Frees a ggml context (tensor objects only) once the head made over it is gone; keeps the row copy alive."""

    def __init__(self, compute: _Compute, ctx: int, rows: np.ndarray) -> None:
        self._c, self._ctx, self.rows = compute, ctx, rows

    def __del__(self) -> None:
        if self._ctx:
            self._c.base.ggml_free(self._ctx)
            self._ctx = None
