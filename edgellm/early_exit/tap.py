"""Reading hidden states out of llama.cpp while it decodes, through the eval callback.

A ``Tap`` is asked about every graph node by name (``l_out-<i>`` after block i, ``result_norm`` for the
normed final state); for the nodes it wants, it copies the tensor and says whether llama.cpp should go on.
Stopping after the last wanted node skips the layers above it and the output head: that is the early exit.
The KV entries of the blocks that did run are written, so a context that always exits at the same place
stays consistent with itself. A ``sibling`` context shares the loaded weights of an existing backend.
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Callable

import llama_cpp
import numpy as np

from edgellm.converters.imatrix import _Ggml, _GgmlTensor
from edgellm.runtime.llamacpp import KV_TYPES, LlamaCppBackend, context_params, new_context

NAME_OFFSET = _GgmlTensor.name.offset      # bytes into struct ggml_tensor where the name starts
FINAL_NAME = "result_norm"                 # the normed final hidden state, input of the output head
OUTPUT_NAME = b"result_output"             # the logits: the output head's product


def layer_output_name(exit_layer: int, n_layers: int) -> str:
    """The graph node holding the hidden state after ``exit_layer`` blocks (all of them: the normed final state)."""
    return FINAL_NAME if exit_layer >= n_layers else f"l_out-{exit_layer - 1}"


# handler(name, (n_rows, n_embd) float32 copy) -> True to let llama.cpp compute the rest of the graph
Handler = Callable[[str, np.ndarray], bool]
# on_output(address of the result_output node, valid during the call only)
OutputWatcher = Callable[[int], None]


class Tap:
    """The eval callback. ``handler`` sees each wanted tensor; ``on_output``, if given, sees the logits node
    of each graph before it is computed (to find the output weight)."""

    def __init__(self, names: list[str], handler: Handler, on_output: OutputWatcher | None = None) -> None:
        self.wanted = {n.encode(): n for n in names}
        self.handler = handler
        self.on_output = on_output
        self.error: BaseException | None = None
        self._ggml = _Ggml.load()
        self.c_callback = llama_cpp.ggml_backend_sched_eval_callback(self)   # kept alive with the tap

    def set_names(self, names: list[str]) -> None:
        self.wanted = {n.encode(): n for n in names}

    def __call__(self, address: int, ask: bool, _user_data) -> bool:
        try:
            name = ctypes.string_at(address + NAME_OFFSET)
            if ask:
                if name == OUTPUT_NAME and self.on_output is not None:
                    self.on_output(address)
                return name in self.wanted
            t = _GgmlTensor.from_address(address)
            rows = np.array(self._ggml.activations(t, address), np.float32).reshape(-1, t.ne[0])
            return bool(self.handler(self.wanted[name], rows))
        except BaseException as exc:   # noqa: BLE001 - must not unwind into C; checked after decode
            self.error = self.error or exc
            return False

    def check(self) -> None:
        """Re-raise an error the callback swallowed."""
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def sibling(backend: LlamaCppBackend, tap: Tap, *, n_ctx: int | None = None, kv_type: str = "f16") -> LlamaCppBackend:
    """A second context (own KV cache, own batch) on ``backend``'s loaded model, with ``tap`` installed.

    The model stays owned by ``backend``: close the sibling first. Raises ModelLoadError.
    """
    n_threads, n_threads_batch = backend.threads
    params = context_params(n_ctx=n_ctx or backend.n_ctx, n_batch=backend.n_batch, n_threads=n_threads,
                            n_threads_batch=n_threads_batch, kv_type=KV_TYPES[kv_type])
    params.cb_eval, params.cb_eval_user_data = tap.c_callback, None
    ctx = new_context(backend.path, backend._model, params)
    n_gpu_layers = 0 if backend.id == "llama.cpp-cpu" else -1
    ctx_backend = LlamaCppBackend(backend.path, backend._model, ctx, backend.n_batch, n_gpu_layers,
                                  contextlib.ExitStack(), params)
    ctx_backend.tap = tap            # the C callback must outlive the context
    return ctx_backend
