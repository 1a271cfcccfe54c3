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
from edgellm.errors import ModelLoadError
from edgellm.runtime.llamacpp import (FLOAT_KV_TYPES, KV_TYPES, MAX_OUTPUTS_PER_CALL, LlamaCppBackend)

NAME_OFFSET = _GgmlTensor.name.offset      # bytes into struct ggml_tensor where the name starts
FINAL_NAME = "result_norm"                 # the normed final hidden state, input of the output head


def layer_output_name(exit_layer: int, n_layers: int) -> str:
    """The graph node holding the hidden state after ``exit_layer`` blocks (all of them: the normed final state)."""
    return FINAL_NAME if exit_layer >= n_layers else f"l_out-{exit_layer - 1}"


# handler(name, (n_rows, n_embd) float32 copy) -> True to let llama.cpp compute the rest of the graph
Handler = Callable[[str, np.ndarray], bool]


class Tap:
    """The eval callback. ``handler`` sees each wanted tensor; ``new_call`` resets per-decode state."""

    def __init__(self, names: list[str], handler: Handler) -> None:
        self.wanted = {n.encode(): n for n in names}
        self.handler = handler
        self.error: BaseException | None = None
        self._ggml = _Ggml.load()
        self.c_callback = llama_cpp.ggml_backend_sched_eval_callback(self)   # kept alive with the tap

    def set_names(self, names: list[str]) -> None:
        self.wanted = {n.encode(): n for n in names}

    def __call__(self, address: int, ask: bool, _user_data) -> bool:
        try:
            name = ctypes.string_at(address + NAME_OFFSET)
            if ask:
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
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx or backend.n_ctx
    params.n_batch = params.n_ubatch = backend.n_batch
    params.n_seq_max = 1
    params.n_outputs_max = MAX_OUTPUTS_PER_CALL
    n_threads, n_threads_batch = backend.threads
    params.n_threads, params.n_threads_batch = n_threads, n_threads_batch
    params.type_k = params.type_v = KV_TYPES[kv_type]
    params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED if KV_TYPES[kv_type] in FLOAT_KV_TYPES
                              else llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED)   # as the main context does
    params.swa_full = False
    params.no_perf = True
    params.cb_eval, params.cb_eval_user_data = tap.c_callback, None
    ctx = llama_cpp.llama_init_from_model(backend._model, params)
    if not ctx:
        raise ModelLoadError(str(backend.path), "could not create a second context for early exit")
    stack = contextlib.ExitStack()
    stack.callback(llama_cpp.llama_free, ctx)
    n_gpu_layers = 0 if backend.id == "llama.cpp-cpu" else -1
    ctx_backend = LlamaCppBackend(backend.path, backend._model, ctx, backend.n_batch, n_gpu_layers, stack)
    ctx_backend.tap = tap            # the C callback must outlive the context
    return ctx_backend
