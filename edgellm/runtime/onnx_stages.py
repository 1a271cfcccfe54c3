"""One ONNX Runtime session over a decoder graph, or over a part of one, and the KV cache of its layers.

The ONNX backend runs one ``Stage`` over the whole decoder; with early exit it runs the graph cut at layer E
(``edgellm.converters.onnx.split``) as lower, middle and head stages (``onnx_split``), each fed the one
before's hidden state. A stage keeps its own position: the lower part may run ahead of the others while
drafting.

KV cache: graphs with GroupQueryAttention share one preallocated (1, kv_heads, n_ctx, head_dim) buffer per
layer and tensor between ``past_key_values.{i}`` and ``present.{i}`` (GQA appends in place, nothing is copied
and truncation only moves ``n_past``); a stage can be bound to another stage's buffers (the fill graph writes
the upper layers' cache). Standard-op graphs (Concat) feed each run's present as the next past.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from edgellm.errors import OnnxRunError

LOGITS_TO_KEEP = "logits_to_keep"


def batches(n_tokens: int, n_batch: int, wanted: Sequence[int]) -> Iterator[tuple[int, int, list[int], int]]:
    """The runs a decode call of ``n_tokens`` makes, at most ``n_batch`` positions each: (start, n, the wanted
    indices into that run, ``logits_to_keep``: the span from the first wanted one to the run's end, 1 if none)."""
    for start in range(0, n_tokens, n_batch):
        n = min(n_batch, n_tokens - start)
        outputs = [i - start for i in wanted if start <= i < start + n]
        yield start, n, outputs, (n - outputs[0] if outputs else 1)


def kept_rows(logits: np.ndarray, n: int, outputs: Sequence[int]) -> np.ndarray:
    """Rows ``outputs`` (indices into a run over ``n`` positions) of a run's logits, which hold its last rows
    (``logits_to_keep``; all n where a graph has no such input); (len(outputs), n_vocab) float32."""
    first = n - logits.shape[0]
    return logits[[o - first for o in outputs]].astype(np.float32, copy=False)


@dataclass(frozen=True)
class GraphLayout:
    """Where a graph's cache lives and what it looks like (from genai_config.json and the session)."""

    past: tuple[str, str]          # input name patterns, % layer index
    present: tuple[str, str]       # output name patterns
    kv_heads: int
    head_dim: int
    dtype: np.dtype
    n_ctx: int
    shared: bool                   # GQA's past/present share one buffer
    device: str                    # OrtValue device of the buffers ("cpu", "cuda", "dml")
    mask: str = "attention_mask"
    positions: str = "position_ids"

    def empty(self) -> Any:
        return ort.OrtValue.ortvalue_from_numpy(np.zeros((1, self.kv_heads, 0, self.head_dim), self.dtype))

    def allocate(self, n_layers: int) -> list[list[Any]]:
        shape = [1, self.kv_heads, self.n_ctx, self.head_dim]
        return [[ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device, 0) for _ in range(2)]
                for _ in range(n_layers)]


class Stage:
    """A session (``make_session()`` creates it, again after a thread change; ``session``: the first one, made
    already) over graph ``layers``' cache. ``buffers``: another stage's cache to bind (shared-buffer graphs
    only; the same layers), else its own."""

    def __init__(self, make_session: Callable[[], ort.InferenceSession], layers: Sequence[int], kv: GraphLayout,
                 name: str, buffers: list[list[Any]] | None = None, session: ort.InferenceSession | None = None
                 ) -> None:
        self._make, self.layers, self.layout, self.name = make_session, list(layers), kv, name
        self.n_past = 0
        self.session = session if session is not None else make_session()
        self._signature()
        self.kv: list[list[Any]] = buffers if buffers is not None else (kv.allocate(len(self.layers)) if kv.shared
                                                                          else [])
        self._io = self._binding() if kv.shared else None

    def _signature(self) -> None:
        overridable = {i.name for i in self.session.get_overridable_initializers()}
        self.inputs = {i.name for i in self.session.get_inputs()} | overridable
        cache = {p % i for i in self.layers for p in self.layout.present}
        self.outputs = [o.name for o in self.session.get_outputs() if o.name not in cache]

    def renew(self) -> None:
        """Create the session again (a new thread pool); the old one is released first (two would hold two
        prepacked copies of the weights). The cache is kept."""
        self.session = self._io = None
        self.session = self._make()
        self._io = self._binding() if self.layout.shared else None

    def _binding(self) -> Any:
        """An IO binding with the outputs and the cache bound. Shared-buffer graphs keep one for the session's
        life (their buffers never move; each run rebinds only the per-call inputs and outputs)."""
        io = self.session.io_binding()
        for name in self.outputs:                  # first: get_outputs() follows the binding order
            io.bind_output(name, "cpu")
        for j, i in enumerate(self.layers):
            for which in range(2):
                past, present = self.layout.past[which] % i, self.layout.present[which] % i
                if self.layout.shared:           # one buffer for past and present: GQA appends at n_past in place
                    io.bind_ortvalue_input(past, self.kv[j][which])
                    io.bind_ortvalue_output(present, self.kv[j][which])
                else:
                    io.bind_ortvalue_input(past, self.kv[j][which] if self.kv and self.n_past else self.layout.empty())
                    io.bind_output(present, self.layout.device)
        return io

    def run(self, feeds: Mapping[str, np.ndarray], n: int, where: str) -> dict[str, np.ndarray]:
        """One run over ``n`` new positions at ``n_past`` (the mask and positions are added here); returns
        the non-cache outputs by name. ``where`` names the model in errors."""
        io = self._io if self.layout.shared else self._binding()
        past = self.n_past
        for name in self.outputs:
            io.bind_output(name, "cpu")            # unallocated again: shapes change between runs
        inputs = {self.layout.mask: np.ones((1, past + n), np.int64),
                  self.layout.positions: np.arange(past, past + n, dtype=np.int64)[None], **feeds}
        for name, value in inputs.items():
            if name == LOGITS_TO_KEEP and name in self.inputs:   # an initializer with a default: an OrtValue
                io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value))
            elif name in self.inputs:
                io.bind_cpu_input(name, value)
        try:
            self.session.run_with_iobinding(io)
        except Exception as exc:               # onnxruntime raises its own Fail/InvalidArgument/... types
            raise OnnxRunError(where, str(exc).strip().splitlines()[0]) from None
        values = io.get_outputs()
        k = len(self.outputs)
        if not self.layout.shared:
            self.kv = [[values[k + 2 * j], values[k + 1 + 2 * j]] for j in range(len(self.layers))]
        self.n_past = past + n
        return {name: values[j].numpy() for j, name in enumerate(self.outputs)}

    def truncate(self, n_past: int) -> None:
        if n_past >= self.n_past:
            return
        if not self.layout.shared and self.kv and n_past > 0:
            self.kv = [[ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :n_past]))
                        for v in pair] for pair in self.kv]
        self.n_past = max(n_past, 0)

    def close(self) -> None:
        self.session = self._io = None
        self.kv = []
