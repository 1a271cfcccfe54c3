"""The llama.cpp backend, through llama-cpp-python's low-level ctypes API (``llama_cpp.llama_cpp``).

Not the high-level ``Llama`` class: that one asks for logits at every position of a prompt when drafts
are used, while ``decode`` here returns logits only where asked (the last token of a prompt, or the k
positions of a draft being verified). The weights are memory-mapped by default, so loading reads only
what is touched. llama.cpp's log goes to the ``edgellm.llamacpp`` logger when verbose and is dropped
otherwise; its warnings and errors are kept to explain a failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
from collections import deque
from pathlib import Path
from typing import Sequence

import llama_cpp
import numpy as np

from edgellm.errors import ContextOverflowError, DecodeError, ModelLoadError
from edgellm.runtime.base import LogitsFor, SpecialTokens, default_n_ctx, output_indices

logger = logging.getLogger("edgellm.llamacpp")

DEFAULT_N_BATCH = 512          # tokens per llama_decode call (llama.cpp's default)
# Most logits rows one llama_decode may return. llama.cpp reserves its compute buffer for this many
# output rows (n_vocab floats each: 1 MiB per row for Gemma 3's 262k vocabulary) and aborts the process
# if a batch asks for more, so decode() splits calls to stay under it. 32 covers draft verification.
MAX_OUTPUTS_PER_CALL = 32
PIECE_BUFFER_BYTES = 64
SEQ_ID = 0                     # the one sequence this backend keeps

# KV-cache element types by name -> ggml type id (ggml.h `enum ggml_type`).
KV_TYPES: dict[str, int] = {
    "f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16, "bf16": 30,
    "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q5_1": llama_cpp.GGML_TYPE_Q5_1, "q5_0": llama_cpp.GGML_TYPE_Q5_0,
    "q4_1": llama_cpp.GGML_TYPE_Q4_1, "q4_0": llama_cpp.GGML_TYPE_Q4_0, "iq4_nl": llama_cpp.GGML_TYPE_IQ4_NL,
}
FLOAT_KV_TYPES = frozenset(KV_TYPES[name] for name in ("f32", "f16", "bf16"))   # no flash attention needed

# (mmap, mlock) -> llama.cpp load mode (llama.h `enum llama_load_mode`).
LOAD_MODES: dict[tuple[bool, bool], int] = {
    (True, False): llama_cpp.LLAMA_LOAD_MODE_MMAP,
    (True, True): llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK,
    (False, True): llama_cpp.LLAMA_LOAD_MODE_MLOCK,
    (False, False): llama_cpp.LLAMA_LOAD_MODE_NONE,
}

# Name of a ggml backend registry in llama_print_system_info() -> our backend id (edgellm/backends.py).
GPU_REGISTRIES: dict[str, str] = {"CUDA": "llama.cpp-cuda", "METAL": "llama.cpp-metal", "MTL": "llama.cpp-metal",
                                  "VULKAN": "llama.cpp-vulkan"}

# ggml.h `enum ggml_log_level` -> logging level. CONT (5) continues the previous line.
LOG_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
LOG_CONT = 5
LOG_WARN = 3
LOG_TAIL_LINES = 40


class _LogState:
    verbose = False
    last_level = 0
    tail: deque[tuple[int, str]] = deque(maxlen=LOG_TAIL_LINES)   # recent (level, line) warnings and errors


@llama_cpp.llama_log_callback
def _on_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    level = _LogState.last_level if level == LOG_CONT else level
    _LogState.last_level = level
    message = text.decode("utf-8", "replace")
    if level >= LOG_WARN and message.strip():
        _LogState.tail.append((level, message.strip()))
    if _LogState.verbose and message.strip():
        logger.log(LOG_LEVELS.get(level, logging.DEBUG), "%s", message.rstrip())


_initialized = False


def init_logging(verbose: bool) -> None:
    """Route llama.cpp's log to ours (replacing llama-cpp-python's stderr printer) and init the backend."""
    global _initialized
    _LogState.verbose = verbose
    if not _initialized:
        llama_cpp.llama_log_set(_on_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _initialized = True


def recent_problems(default: str) -> str:
    """The last few errors llama.cpp logged (warnings if there were none), for an error message."""
    errors = [line for level, line in _LogState.tail if level > LOG_WARN]
    lines = errors or [line for _, line in _LogState.tail]
    return "; ".join(lines[-3:]) if lines else default


def backend_id(n_gpu_layers: int) -> str:
    """Our backend id for this llama.cpp build: a GPU row when layers are offloaded to a GPU registry."""
    if n_gpu_layers == 0 or not llama_cpp.llama_supports_gpu_offload():
        return "llama.cpp-cpu"
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    registries = [part.split(":")[0].strip().upper() for part in info.split("|") if ":" in part]
    return next((GPU_REGISTRIES[r] for r in registries if r in GPU_REGISTRIES), "llama.cpp-cpu")


# --- mlock: llama.cpp only logs a warning when the OS refuses, so check what was locked ---

def locked_bytes() -> int | None:
    """Bytes this process has locked in RAM (Linux VmLck), or None where the OS does not say."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            line = next((l for l in f if l.startswith("VmLck:")), None)
    except OSError:
        return None
    return int(line.split()[1]) * 1024 if line else None   # the kernel reports kB


def memlock_limit() -> int | None:
    """The soft RLIMIT_MEMLOCK in bytes; None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


def mlock_outcome(file_size: int, locked_delta: int | None, limit: int | None,
                  warnings: Sequence[str]) -> tuple[bool, str | None]:
    """Whether an mlock request took effect, and a note for the user when it did not."""
    refused = next((w for w in warnings if "mlock" in w), None)
    if refused is None and locked_delta != 0:
        return True, None
    limit_text = "unlimited" if limit is None else f"{limit / 2**20:.1f} MiB"
    # llama.cpp's line: "warning: failed to mlock N-byte buffer (...): <strerror>\nTry increasing ..."
    reason = refused.splitlines()[0].removeprefix("warning: ") if refused else "nothing was locked"
    return False, (f"mlock was refused ({reason}); RLIMIT_MEMLOCK is {limit_text} and the model file is "
                   f"{file_size / 2**20:.1f} MiB: raise the limit (`ulimit -l`, or memlock in "
                   f"/etc/security/limits.conf) or grant CAP_IPC_LOCK; the model stays loaded, unlocked")


class Vocab:
    """llama.cpp's tokenizer on a loaded model: tokens, special tokens, chat template and GGUF metadata.

    ``LlamaCppBackend`` is one; ``Vocab.load`` reads only a GGUF's vocabulary (``vocab_only``: no weights, no
    context), which the ONNX backend uses on the ``tokenizer.gguf`` of an ONNX folder so that both formats
    give the same ids.
    """

    _owned = False             # True: a vocabulary-only model this object frees (a backend's stack frees its own)

    def __init__(self, model: int) -> None:
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._pieces: dict[int, bytes] = {}
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.metadata = self._read_metadata()
        template = llama_cpp.llama_model_chat_template(model, None)
        self.chat_template = template.decode("utf-8") if template else None
        self.special = self._read_special()

    @classmethod
    def load(cls, path: str | Path, *, verbose: bool = False) -> "Vocab":
        """The vocabulary of the GGUF at ``path`` (its tensors are not read); ``close()`` frees it.

        Raises:
            ModelLoadError: llama.cpp cannot read the file's vocabulary.
        """
        init_logging(verbose)
        _LogState.tail.clear()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(os.fsencode(path), params)
        if not model:
            raise ModelLoadError(str(path), recent_problems("llama.cpp could not read the vocabulary"))
        vocab = cls(model)
        vocab._owned = True
        return vocab

    def _read_metadata(self) -> dict[str, str]:
        meta: dict[str, str] = {}
        key = ctypes.create_string_buffer(256)
        for i in range(llama_cpp.llama_model_meta_count(self._model)):
            if llama_cpp.llama_model_meta_key_by_index(self._model, i, key, len(key)) < 0:
                continue
            size = llama_cpp.llama_model_meta_val_str_by_index(self._model, i, None, 0)
            value = ctypes.create_string_buffer(max(size, 0) + 1)
            llama_cpp.llama_model_meta_val_str_by_index(self._model, i, value, len(value))
            meta[key.value.decode("utf-8", "replace")] = value.value.decode("utf-8", "replace")
        return meta

    def _read_special(self) -> SpecialTokens:
        def token(value: int) -> int | None:
            return value if value >= 0 else None       # llama.cpp uses -1 for "none"
        bos, eos = token(llama_cpp.llama_vocab_bos(self._vocab)), token(llama_cpp.llama_vocab_eos(self._vocab))
        return SpecialTokens(bos=bos, eos=eos, eot=token(llama_cpp.llama_vocab_eot(self._vocab)),
                             add_bos=bool(llama_cpp.llama_vocab_get_add_bos(self._vocab)),
                             bos_text=self._special_text(bos), eos_text=self._special_text(eos))

    def _special_text(self, token: int | None) -> str:
        if token is None:
            return ""
        text = llama_cpp.llama_vocab_get_text(self._vocab, token)
        return text.decode("utf-8", "replace") if text else ""

    # --- tokens ---

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 2                       # at most one token per byte, plus BOS/EOS
        while True:
            ids = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), ids, capacity, add_special, parse_special)
            if n >= 0:
                return list(ids[:n])
            capacity = -n                              # negative: the count it needs

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            size = PIECE_BUFFER_BYTES
            while True:
                buf = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, size, 0, False)
                if n >= 0:
                    break
                size = -n
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def detokenize(self, tokens: Sequence[int]) -> str:
        ids = (llama_cpp.llama_token * max(len(tokens), 1))(*tokens)
        size = sum(len(self.token_bytes(t)) for t in tokens) + 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_detokenize(self._vocab, ids, len(tokens), buf, size, True, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            size = -n

    def is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def close(self) -> None:
        if self._owned and self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None


class LlamaCppBackend(Vocab):
    """A llama.cpp model, context and batch; one KV sequence. See ``edgellm.runtime.base.Backend``."""

    def __init__(self, path: Path, model: int, ctx: int, n_batch: int, n_gpu_layers: int,
                 stack: contextlib.ExitStack, params: "llama_cpp.llama_context_params") -> None:
        """Takes ownership of ``ctx`` (made from ``params``): ``stack`` frees it first, then what it held before."""
        self._ctx, self._stack, self._params = ctx, stack, params
        stack.callback(self._free_context)
        super().__init__(model)
        self.path = path
        self._memory = llama_cpp.llama_get_memory(ctx)
        self.tap = None                   # an eval callback installed with install_tap, kept alive here
        self.id = backend_id(n_gpu_layers)
        self.n_ctx = llama_cpp.llama_n_ctx(ctx)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(model)
        self.n_swa = llama_cpp.llama_model_n_swa(model)      # sliding window in tokens; 0 when none
        self.n_batch = n_batch
        self.mlock_locked = False
        self.mlock_note: str | None = None
        self._n_past = 0
        self._init_batch(n_batch)

    # --- loading ---

    @classmethod
    def load(cls, path: str | Path, *, n_ctx: int | None, n_threads: int, n_threads_batch: int,
             n_batch: int = DEFAULT_N_BATCH, mmap: bool = True, mlock: bool = False, kv_type: str = "f16",
             n_gpu_layers: int = -1, verbose: bool = False) -> "LlamaCppBackend":
        """Load a GGUF file and create a context of ``n_ctx`` tokens (None: base.default_n_ctx).

        Raises:
            ModelLoadError: llama.cpp cannot read the file or create the context, or ``kv_type`` is unknown.
        """
        path = Path(path)
        if kv_type not in KV_TYPES:
            raise ModelLoadError(str(path), f"unknown kv_type {kv_type!r}; known: {', '.join(KV_TYPES)}")
        init_logging(verbose)
        _LogState.tail.clear()
        locked_before = locked_bytes()
        stack = contextlib.ExitStack()
        try:
            model = _load_model(path, mmap=mmap, mlock=mlock, n_gpu_layers=n_gpu_layers)
            stack.callback(llama_cpp.llama_model_free, model)
            if n_ctx is None:
                n_ctx = default_n_ctx(llama_cpp.llama_model_n_ctx_train(model))
            params = context_params(n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                                    n_threads_batch=n_threads_batch, kv_type=KV_TYPES[kv_type])
            backend = cls(path, model, new_context(path, model, params), n_batch, n_gpu_layers, stack, params)
        except BaseException:
            stack.close()
            raise
        if mlock:
            after = locked_bytes()
            delta = None if after is None or locked_before is None else after - locked_before
            backend.mlock_locked, backend.mlock_note = mlock_outcome(
                path.stat().st_size, delta, memlock_limit(), [line for _, line in _LogState.tail])
            if backend.mlock_note:
                logger.warning("%s", backend.mlock_note)
        return backend

    def _free_context(self) -> None:
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None

    def install_tap(self, tap) -> None:
        """Recreate the context with ``tap`` (an ``edgellm.early_exit.tap.Tap``; None: no callback) as llama.cpp's
        eval callback; the KV cache starts empty. Same settings and threads otherwise. Raises ModelLoadError."""
        params = llama_cpp.llama_context_params.from_buffer_copy(self._params)
        params.n_threads, params.n_threads_batch = self.threads
        params.cb_eval = tap.c_callback if tap is not None else llama_cpp.ggml_backend_sched_eval_callback()
        params.cb_eval_user_data = None
        ctx = new_context(self.path, self._model, params)
        self._free_context()
        self._ctx, self._params, self.tap = ctx, params, tap
        self._memory = llama_cpp.llama_get_memory(ctx)
        self.n_ctx = llama_cpp.llama_n_ctx(ctx)
        self._n_past = 0

    def _init_batch(self, n_batch: int) -> None:
        batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._stack.callback(llama_cpp.llama_batch_free, batch)
        self._batch = batch
        for i in range(n_batch):                  # every token belongs to sequence 0, set once
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = SEQ_ID
        # numpy views on the batch's C arrays, (n_batch,) each
        self._tok = np.ctypeslib.as_array(batch.token, shape=(n_batch,))
        self._pos = np.ctypeslib.as_array(batch.pos, shape=(n_batch,))
        self._out = np.ctypeslib.as_array(batch.logits, shape=(n_batch,))

    # --- KV cache ---

    @property
    def n_past(self) -> int:
        return self._n_past

    def decode(self, tokens: Sequence[int], logits_for: LogitsFor = "last") -> np.ndarray:
        wanted = output_indices(len(tokens), logits_for)
        if self._n_past + len(tokens) > self.n_ctx:
            raise ContextOverflowError(self._n_past + len(tokens), self.n_ctx, "the sequence")
        rows = []
        for start, stop in plan_calls(len(tokens), wanted, self.n_batch, MAX_OUTPUTS_PER_CALL):
            outputs = [i - start for i in wanted if start <= i < stop]
            self._decode_call(tokens[start:stop], outputs)
            if outputs:
                logits = llama_cpp.llama_get_logits(self._ctx)    # (len(outputs), n_vocab) float32
                rows.append(np.ctypeslib.as_array(logits, shape=(len(outputs), self.n_vocab)).copy())
        return np.concatenate(rows) if rows else np.empty((0, self.n_vocab), np.float32)

    def _decode_call(self, tokens: Sequence[int], outputs: list[int]) -> None:
        n = len(tokens)
        self._tok[:n] = tokens
        self._pos[:n] = np.arange(self._n_past, self._n_past + n)
        self._out[:n] = 0
        self._out[outputs] = 1
        self._batch.n_tokens = n
        code = llama_cpp.llama_decode(self._ctx, self._batch)
        if code != 0:
            # On fatal errors some micro-batches stay in the cache: resynchronise n_past with it.
            self._n_past = llama_cpp.llama_memory_seq_pos_max(self._memory, SEQ_ID) + 1
            raise DecodeError(code, recent_problems("no KV slot for the batch" if code == 1 else "see the log"))
        self._n_past += n

    def truncate(self, n_past: int) -> bool:
        if n_past >= self._n_past:
            return True
        if n_past > 0 and llama_cpp.llama_memory_seq_rm(self._memory, SEQ_ID, n_past, -1):
            # A window-sized sliding-window cache drops old positions yet reports success: the truncation
            # holds only if the positions the next token attends to (the last window before n_past) are
            # all still there (the same rule llama-server applies).
            needed_from = max(0, n_past - self.n_swa) if self.n_swa else 0
            if (llama_cpp.llama_memory_seq_pos_min(self._memory, SEQ_ID) <= needed_from
                    and llama_cpp.llama_memory_seq_pos_max(self._memory, SEQ_ID) == n_past - 1):
                self._n_past = n_past
                return True
        llama_cpp.llama_memory_clear(self._memory, True)
        self._n_past = 0
        return n_past == 0

    # --- resources ---

    def set_threads(self, n_decode: int, n_batch: int) -> None:
        llama_cpp.llama_set_n_threads(self._ctx, n_decode, n_batch)

    @property
    def threads(self) -> tuple[int, int]:
        return llama_cpp.llama_n_threads(self._ctx), llama_cpp.llama_n_threads_batch(self._ctx)

    def close(self) -> None:
        self._stack.close()                             # ExitStack runs each callback once


def plan_calls(n_tokens: int, wanted: Sequence[int], n_batch: int, max_outputs: int) -> list[tuple[int, int]]:
    """Split a decode of ``n_tokens`` into [start, stop) calls of at most ``n_batch`` tokens and at most
    ``max_outputs`` of the ``wanted`` (sorted) output indices each."""
    calls, start, k = [], 0, 0
    while start < n_tokens:
        stop = min(start + n_batch, n_tokens)
        while k < len(wanted) and wanted[k] < start:
            k += 1
        if len(wanted) - k > max_outputs and wanted[k + max_outputs] < stop:
            stop = wanted[k + max_outputs]            # end the call before the output that would not fit
        calls.append((start, stop))
        start = stop
    return calls


def _load_model(path: Path, *, mmap: bool, mlock: bool, n_gpu_layers: int) -> int:
    if not path.is_file():
        raise ModelLoadError(str(path), "no such file")
    params = llama_cpp.llama_model_default_params()
    params.load_mode = LOAD_MODES[(mmap, mlock)]
    params.n_gpu_layers = n_gpu_layers
    model = llama_cpp.llama_model_load_from_file(os.fsencode(path), params)
    if not model:
        raise ModelLoadError(str(path), recent_problems("llama.cpp could not read it"))
    return model


def context_params(*, n_ctx: int, n_batch: int, n_threads: int, n_threads_batch: int,
                   kv_type: int) -> "llama_cpp.llama_context_params":
    """The llama.cpp context settings every context of this backend uses (one sequence, sized batches)."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = n_batch
    params.n_seq_max = 1
    params.n_outputs_max = MAX_OUTPUTS_PER_CALL
    params.n_threads, params.n_threads_batch = n_threads, n_threads_batch
    params.type_k = params.type_v = kv_type
    # Flash attention only where llama.cpp needs it (a quantized V cache). On the CPU it accumulates in f16:
    # measured on Gemma 3 270M, "auto" (which turns it on) moved logits by KLD 0.0066 against the plain path
    # and made results depend on how tokens were batched.
    params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED if kv_type in FLOAT_KV_TYPES
                              else llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED)
    # Sliding-window layers keep only their window (what the memory planner counts): on edge devices the
    # memory matters more than reusing a prefix that was cut more than a window back (see truncate()).
    params.swa_full = False
    params.no_perf = True
    return params


def new_context(path: Path, model: int, params: "llama_cpp.llama_context_params") -> int:
    """A llama.cpp context on ``model``. Raises ModelLoadError."""
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise ModelLoadError(str(path), f"could not create a context of {params.n_ctx} tokens: "
                                        + recent_problems("out of memory?"))
    return ctx
