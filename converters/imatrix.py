"""Importance matrices: what llama-imatrix collects, computed through llama.cpp itself, in its file formats.

For every weight matrix W of a transformer block, llama.cpp's quantizers weigh each input column j by E[x_j²], the
mean square of the activations that W multiplies (ggml-quants.c quantize_row_*_impl). ``compute_imatrix`` runs the
model in llama.cpp on calibration text and, like tools/imatrix/imatrix.cpp, watches every MUL_MAT node whose src0 is
a ``blk.*`` weight through the scheduler's eval callback (``llama_context_params.cb_eval``), adding the squares of
src1 (the activations, F32) per column: ``in_sum2[j] += x_j²`` and ``counts += rows``. MoE expert matrices
(MUL_MAT_ID) are skipped and reported; the output head is skipped as llama-imatrix does without --process-output.
Collecting inside llama.cpp, rather than in a numpy forward pass, gives exactly the activations the runtime sees,
for every architecture llama.cpp runs, at llama.cpp's speed; the price is reading ggml structs through ctypes.

Files: the GGUF format of llama-imatrix (``general.type = imatrix``; per weight ``<name>.in_sum2`` F32 ne=[n_per_row,
n_mat] and ``<name>.counts`` F32 ne=[1, n_mat]; ``imatrix.datasets``, ``imatrix.chunk_count``, ``imatrix.chunk_size``;
common/imatrix-loader.h) is written and read; the legacy ``.dat`` format (values = mean square × ncall) too.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from edgellm.converters.quant_types import OUTPUT, TOKEN_EMBD
from edgellm.converters.quantize import capture_llama_log
from edgellm.errors import ImatrixError, ModelLoadError, UsageError

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]   # (tokens evaluated, tokens to evaluate)

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUMS = ".in_sum2"
SUFFIX_COUNTS = ".counts"
DEFAULT_MAX_TOKENS = 4096
HEAD_TENSORS = frozenset({OUTPUT, TOKEN_EMBD[0]})   # MUL_MAT weights of the output head (tied: token_embd)
MIN_CTX = 8                  # a window is BOS plus text; tiny windows measure little but BOS
DEFAULT_BATCH = 256          # tokens per llama_decode; logits for all of them are kept (n_vocab floats each)


@dataclass
class Imatrix:
    """Per weight matrix: sums of squared input activations per column, and how many rows (tokens) were summed."""

    sums: dict[str, np.ndarray]      # name -> (n_mat, n_per_row) float32, Σ x_j² (n_mat = experts, 1 for dense)
    counts: dict[str, np.ndarray]    # name -> (n_mat,) float32, activation rows summed
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0             # context windows evaluated
    chunk_size: int = 0              # tokens per window (n_ctx)
    n_tokens: int = 0                # tokens evaluated
    skipped: list[str] = field(default_factory=list)   # MoE weights seen but not collected

    def mean_squares(self) -> dict[str, np.ndarray]:
        """name -> flat (n_mat * n_per_row) float32 E[x_j²], as llama-quantize hands them to llama.cpp (1 if unseen)."""
        out = {}
        for name, sums in self.sums.items():
            counts = self.counts[name].reshape(-1, 1)
            means = np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)
            out[name] = np.ascontiguousarray(means, dtype=np.float32).reshape(-1)
        return out

    def save(self, path: str | Path) -> Path:
        """Write llama-imatrix's GGUF format (or the legacy format when ``path`` ends in ``.dat``); return the path."""
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        try:
            (_save_legacy if path.suffix == ".dat" else _save_gguf)(self, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


def load_imatrix(path: str | Path) -> Imatrix:
    """Read an importance matrix written by llama-imatrix or ``Imatrix.save`` (GGUF, or the legacy .dat).

    Raises:
        ImatrixError: a missing, truncated or inconsistent file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ImatrixError(path=str(path), problem=exc.strerror or str(exc)) from None
    try:
        return _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)
    except (ValueError, KeyError, IndexError, struct.error) as exc:
        raise ImatrixError(path=str(path), problem=f"unreadable ({exc})") from None


# ---------------------------------------------------------------------------------------------------------------
# File formats
# ---------------------------------------------------------------------------------------------------------------

def _save_gguf(m: Imatrix, path: Path) -> None:
    writer = gguf.GGUFWriter(path, arch="imatrix")
    # llama-imatrix writes no general.architecture; GGUFWriter always adds one, so drop it (an imatrix is no model)
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
    writer.add_type("imatrix")
    writer.add_array(KEY_DATASETS, list(m.datasets))
    writer.add_uint32(KEY_CHUNK_COUNT, m.chunk_count)
    writer.add_uint32(KEY_CHUNK_SIZE, m.chunk_size)
    for name in sorted(m.sums):   # llama-imatrix sorts names for a deterministic file
        writer.add_tensor(name + SUFFIX_SUMS, np.asarray(m.sums[name], np.float32))
        writer.add_tensor(name + SUFFIX_COUNTS, np.asarray(m.counts[name], np.float32).reshape(-1, 1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _load_gguf(path: Path) -> Imatrix:
    reader = gguf.GGUFReader(path)
    tensors = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
    names = sorted(n[: -len(SUFFIX_SUMS)] for n in tensors if n.endswith(SUFFIX_SUMS))
    if not names:
        raise ValueError(f"no {SUFFIX_SUMS} tensors")
    sums, counts = {}, {}
    for name in names:
        if name + SUFFIX_COUNTS not in tensors:
            raise ValueError(f"{name} has sums but no counts")
        c = tensors[name + SUFFIX_COUNTS].reshape(-1)
        sums[name], counts[name] = tensors[name + SUFFIX_SUMS].reshape(c.size, -1), c
    field_ = reader.fields.get(KEY_DATASETS)
    datasets = list(field_.contents()) if field_ is not None else []
    chunk_count, chunk_size = (_scalar(reader, k) for k in (KEY_CHUNK_COUNT, KEY_CHUNK_SIZE))
    return Imatrix(sums, counts, datasets, chunk_count, chunk_size, n_tokens=int(max(c.max() for c in counts.values())))


def _scalar(reader: gguf.GGUFReader, key: str) -> int:
    field_ = reader.fields.get(key)
    return int(field_.contents()) if field_ is not None else 0


def _save_legacy(m: Imatrix, path: Path) -> None:
    """llama-imatrix save_imatrix_legacy: per entry ncall = ceil(max count / chunk size), values = mean × ncall."""
    chunk = max(m.chunk_size, 1)
    entries = sorted(n for n in m.sums if m.counts[n].max() > 0)   # entries with no data are skipped there too
    out = [struct.pack("<i", len(entries))]
    for name in entries:
        ncall = int(-(-m.counts[name].max() // chunk))
        counts = m.counts[name].reshape(-1, 1)
        values = np.where(counts > 0, m.sums[name] / np.maximum(counts, 1), 1.0) * ncall
        encoded = name.encode()
        out += [struct.pack("<i", len(encoded)), encoded, struct.pack("<ii", ncall, values.size),
                values.astype("<f4").tobytes()]
    dataset = (m.datasets[-1] if m.datasets else "").encode()
    out += [struct.pack("<i", m.chunk_count), struct.pack("<i", len(dataset)), dataset]
    path.write_bytes(b"".join(out))


def _load_legacy(path: Path) -> Imatrix:
    """Mean squares come back as sums over ``ncall`` rows with count ``ncall`` (the chunk size is not stored)."""
    data = path.read_bytes()
    (n_entries,), pos = struct.unpack_from("<i", data, 0), 4
    if n_entries < 1:
        raise ValueError("no entries")
    sums, counts = {}, {}
    for _ in range(n_entries):
        (n,) = struct.unpack_from("<i", data, pos)
        name = data[pos + 4:pos + 4 + n].decode()
        ncall, nval = struct.unpack_from("<ii", data, pos + 4 + n)
        pos += 12 + n
        values = np.frombuffer(data, "<f4", nval, pos).astype(np.float32)
        pos += 4 * nval
        sums[name], counts[name] = values.reshape(1, -1), np.array([ncall], np.float32)
    chunk_count, datasets = 0, []
    if pos < len(data):   # the trailer (chunk count, dataset name) is optional
        chunk_count, n = struct.unpack_from("<ii", data, pos)
        datasets = [data[pos + 8:pos + 8 + n].decode()] if n > 0 else []
    return Imatrix(sums, counts, datasets, chunk_count, 0, n_tokens=0)


# ---------------------------------------------------------------------------------------------------------------
# Reading ggml tensors inside the eval callback
# ---------------------------------------------------------------------------------------------------------------

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_NAME, GGML_MAX_OP_PARAMS = 4, 10, 64, 64
GGML_OBJECT_SIZE = 32    # struct ggml_object: offs, size, next, type, padding[4]
GGML_TYPE_F32 = 0
LAYOUT_HINT = "install llama-cpp-python 0.3.36, the version whose ggml headers this code follows"


class _GgmlTensor(ctypes.Structure):
    """struct ggml_tensor as in ggml/include/ggml.h (llama.cpp@0c1e57098); checked against the library at run time."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


@dataclass(frozen=True)
class _Ggml:
    """The few libggml functions the callback needs, bound with ctypes (llama_cpp._ggml binds none)."""

    lib: ctypes.CDLL
    mul_mat: int        # enum ggml_op values, looked up by name
    mul_mat_id: int

    @classmethod
    def load(cls) -> "_Ggml":
        from llama_cpp import _ggml

        lib = _ggml.libggml
        lib.ggml_op_name.restype, lib.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
        lib.ggml_tensor_overhead.restype = ctypes.c_size_t
        lib.ggml_nbytes.restype, lib.ggml_nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
        lib.ggml_get_name.restype, lib.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
        lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        if lib.ggml_tensor_overhead() != GGML_OBJECT_SIZE + ctypes.sizeof(_GgmlTensor):
            raise ImatrixError(path="libggml", problem="struct ggml_tensor has a layout this edgellm does not know",
                               hint_text=LAYOUT_HINT)
        ops = {}
        for value in range(64):   # MUL_MAT sits near the start of enum ggml_op (29 in this version)
            ops[lib.ggml_op_name(value)] = value
            if b"MUL_MAT_ID" in ops:
                return cls(lib, ops[b"MUL_MAT"], ops[b"MUL_MAT_ID"])
        raise ImatrixError(path="libggml", problem="could not find GGML_OP_MUL_MAT", hint_text=LAYOUT_HINT)

    def activations(self, t: _GgmlTensor, address: int) -> np.ndarray:
        """A (ne3, ne2, ne1, ne0) float32 view or copy of an F32 tensor, honouring its byte strides."""
        nbytes = self.lib.ggml_nbytes(address)
        if t.buffer and self.lib.ggml_backend_buffer_is_host(t.buffer):
            raw = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(t.data))
        else:   # device memory (GPU builds): copy to the host first
            raw = np.empty(nbytes, np.uint8)
            self.lib.ggml_backend_tensor_get(address, raw.ctypes.data, 0, nbytes)
        shape = tuple(reversed(t.ne[:GGML_MAX_DIMS]))
        strides = tuple(reversed(t.nb[:GGML_MAX_DIMS]))
        return np.lib.stride_tricks.as_strided(raw.view(np.float32), shape=shape, strides=strides)


def weight_name(raw: bytes) -> str:
    """``CUDA0#blk.0.attn_k.weight#0`` -> ``blk.0.attn_k.weight`` (imatrix.cpp filter_tensor_name)."""
    name = raw.decode("utf-8", errors="replace")
    return name.split("#")[1] if "#" in name else name


class _Collector:
    """The eval callback: per blk.* weight, Σ x² over the rows of its MUL_MAT input (float64 accumulators).

    Every node llama.cpp is asked about splits the graph (a thread sync on each side), so an input shared by
    several weights (attn_q/k/v, ffn_gate/up) is read once: the first consumer is collected, the others reuse its
    squares. ``new_graph`` must be called between llama_decode calls, when node addresses stop meaning anything.
    """

    def __init__(self, ggml: _Ggml, process_output: bool = False):
        self.ggml = ggml
        self.process_output = process_output   # also collect the output head (llama-imatrix --process-output)
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.skipped: set[str] = set()
        self.error: BaseException | None = None
        self._seen: dict[int, tuple[np.ndarray, float]] = {}   # src1 node address -> (squares, rows) this graph

    def new_graph(self) -> None:
        self._seen.clear()

    def __call__(self, address: int, ask: bool, _user_data) -> bool:
        try:
            return self._handle(address, ask)
        except BaseException as exc:   # noqa: BLE001 - must not unwind into C; re-raised after llama_decode
            self.error = self.error or exc
            return False

    def _handle(self, address: int, ask: bool) -> bool:
        t = _GgmlTensor.from_address(address)
        if t.op not in (self.ggml.mul_mat, self.ggml.mul_mat_id) or not t.src[0] or not t.src[1]:
            return False
        src0, src1 = _GgmlTensor.from_address(t.src[0]), _GgmlTensor.from_address(t.src[1])
        name = weight_name(src0.name)
        wanted = name.startswith("blk.") or (self.process_output and name in HEAD_TENSORS)
        if not wanted or src1.type != GGML_TYPE_F32:
            return False
        if t.op == self.ggml.mul_mat_id:
            self.skipped.add(name)
            return False
        if ask:
            if t.src[1] in self._seen and src0.ne[2] * src0.ne[3] == 1:   # same input already collected
                self._add(name, *self._seen[t.src[1]])
                return False
            return True
        squares, rows = self._squares(src0, src1, t.src[1])
        self._seen[t.src[1]] = (squares, rows)
        self._add(name, squares, rows)
        return True

    def _squares(self, src0: _GgmlTensor, src1: _GgmlTensor, src1_address: int) -> tuple[np.ndarray, float]:
        """(n_mat, ne0) Σ x² of this input, and the activation rows per matrix."""
        x = self.ggml.activations(src1, src1_address)   # (ne3, ne2, ne1, ne0) float32
        n_mat = src0.ne[2] * src0.ne[3]   # 3-D weights: one matrix per (i2, i3), as imatrix.cpp maps them
        per = np.einsum("abcj,abcj->abj", x, x, dtype=np.float64)   # (ne3, ne2, ne0)
        squares = np.zeros((n_mat, x.shape[-1]))
        for i3 in range(x.shape[0]):
            for i2 in range(x.shape[1]):
                squares[(i3 % src0.ne[3]) * src0.ne[2] + i2 % src0.ne[2]] += per[i3, i2]
        if not np.isfinite(squares).all():
            raise ImatrixError(path=weight_name(src0.name), problem="non-finite activations on this text",
                               hint_text="the model overflows (try an F32 or BF16 source GGUF)")
        return squares, x.shape[0] * x.shape[1] * x.shape[2] / n_mat

    def _add(self, name: str, squares: np.ndarray, rows: float) -> None:
        if name not in self.sums:
            self.sums[name], self.counts[name] = np.zeros_like(squares), np.zeros(len(squares))
        self.sums[name] += squares
        self.counts[name] += rows


# ---------------------------------------------------------------------------------------------------------------
# Running the model
# ---------------------------------------------------------------------------------------------------------------

def default_calibration_text() -> str:
    """The calibration text bundled with edgellm: English prose and Python code (see the file's first lines)."""
    return resources.files("edgellm").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def chunk_tokens(tokens: list[int], n_ctx: int, bos: int | None) -> list[list[int]]:
    """Split text tokens into windows of at most ``n_ctx``, each opening with BOS when the model wants one.

    llama-imatrix overwrites the first token of each window with BOS; here BOS is prepended to ``n_ctx - 1``
    text tokens instead, so no text is dropped.
    """
    step = n_ctx - 1 if bos is not None else n_ctx
    prefix = [bos] if bos is not None else []
    return [prefix + tokens[i:i + step] for i in range(0, len(tokens), step)]


def take_tokens(windows: list[list[int]], budget: int) -> list[list[int]]:
    """The leading windows holding at most ``budget`` tokens in all (the last one cut short)."""
    taken = []
    for window in windows:
        if budget <= 0:
            break
        taken.append(window[:budget])
        budget -= len(taken[-1])
    return taken


def compute_imatrix(gguf_path: str | Path, text: str | None = None, *, n_ctx: int = 512,
                    max_tokens: int = DEFAULT_MAX_TOKENS, n_threads: int | None = None,
                    progress: Progress | None = None, dataset: str | None = None,
                    process_output: bool = False) -> Imatrix:
    """Compute an importance matrix for ``gguf_path`` by running it in llama.cpp on ``text``.

    ``text`` defaults to the bundled calibration text; at most ``max_tokens`` tokens (BOS included) are evaluated
    in windows of ``n_ctx`` tokens. ``progress(tokens_done, tokens_total)`` is called after each batch.
    ``process_output`` also collects the output head's input (``output.weight``, or ``token_embd.weight`` when
    the embedding is tied), as ``llama-imatrix --process-output`` does; llama.cpp's quantizer uses it for the
    head when present. The budgeted allocator needs it: on Gemma 3 270M the tied head is most of the model.

    Returns:
        Imatrix: sums and counts per blk.* weight matrix; ``n_tokens`` says how many tokens were evaluated.

    Raises:
        ImatrixError: the model cannot be loaded, the text yields no tokens, or llama.cpp fails to evaluate it.
    """
    import llama_cpp

    if n_ctx < MIN_CTX:
        raise UsageError(problem=f"n_ctx {n_ctx} is too small for an importance matrix",
                         hint_text=f"use at least {MIN_CTX} tokens (512 is llama-imatrix's default)")
    source = dataset or ("edgellm calibration.txt" if text is None else "text")
    text = default_calibration_text() if text is None else text
    ggml = _Ggml.load()
    collector = _Collector(ggml, process_output)
    callback = llama_cpp.ggml_backend_sched_eval_callback(collector)   # referenced until the context is freed
    start = time.perf_counter()
    with capture_llama_log() as captured, _Model(gguf_path, n_ctx, n_threads, callback, captured) as model:
        windows = take_tokens(chunk_tokens(model.tokenize(text), n_ctx, model.bos), max_tokens)
        if not windows:
            raise ImatrixError(path=str(gguf_path), problem="the calibration text yields no tokens",
                               hint_text="pass a text of a few thousand tokens, or none for the bundled one")
        done, total = 0, sum(len(w) for w in windows)
        for window in windows:
            done = model.evaluate(window, collector, done, total, progress)
    if captured.error is not None:   # raised inside the log callback (e.g. Ctrl+C while llama.cpp logged)
        raise captured.error
    log.info("importance matrix: %d tokens in %d windows of up to %d, %d matrices, %.1f s",
             done, len(windows), n_ctx, len(collector.sums), time.perf_counter() - start)
    if collector.skipped:
        log.warning("importance matrix: %d MoE expert weights skipped (not collected): %s",
                    len(collector.skipped), ", ".join(sorted(collector.skipped)[:4]))
    sums = {k: v.astype(np.float32) for k, v in collector.sums.items()}
    counts = {k: v.astype(np.float32) for k, v in collector.counts.items()}
    return Imatrix(sums, counts, [source], len(windows), n_ctx, done, sorted(collector.skipped))


class _Model:
    """A llama.cpp model and context with the eval callback installed; freed on exit."""

    def __init__(self, path: str | Path, n_ctx: int, n_threads: int | None, callback, captured):
        self.path, self.n_ctx, self.n_threads, self.callback, self.captured = str(path), n_ctx, n_threads, callback, captured
        self.model = self.ctx = None
        self.batch_size = min(n_ctx, DEFAULT_BATCH)

    def __enter__(self) -> "_Model":
        import llama_cpp

        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(self.path.encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise ModelLoadError(path=self.path, problem=self._why("llama.cpp could not load it"))
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = self.n_ctx, self.batch_size, self.batch_size, 1
        threads = self.n_threads or max(os.cpu_count() or 1, 1)
        params.n_threads = params.n_threads_batch = threads
        params.cb_eval, params.cb_eval_user_data = self.callback, None
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)   # __exit__ does not run when __enter__ raises
            raise ModelLoadError(path=self.path, problem=self._why("llama.cpp could not create a context"))
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.bos = llama_cpp.llama_vocab_bos(self.vocab) if llama_cpp.llama_vocab_get_add_bos(self.vocab) else None
        if self.bos is not None and self.bos < 0:
            self.bos = None
        return self

    def __exit__(self, *exc) -> None:
        import llama_cpp

        if self.ctx:
            llama_cpp.llama_free(self.ctx)
        if self.model:
            llama_cpp.llama_model_free(self.model)

    def _why(self, what: str) -> str:
        errors = self.captured.errors   # the first error line names the cause, later ones only wrap it
        return f"{what}: {errors[0]}" if errors else what

    def tokenize(self, text: str) -> list[int]:
        """Text tokens without BOS (windows get their own)."""
        import llama_cpp

        data = text.encode("utf-8")
        size = len(data) + 16   # a token covers at least one byte; a negative answer gives the size needed
        for _ in range(2):
            buf = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, size, False, False)
            if n >= 0:
                return list(buf[:n])
            size = -n
        raise ImatrixError(path=self.path, problem="llama.cpp could not tokenize the calibration text")

    def evaluate(self, window: list[int], collector: _Collector, done: int, total: int,
                 progress: Progress | None) -> int:
        """Decode one window from an empty cache, all logits on (so the last layer sees every row)."""
        import llama_cpp

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        batch = llama_cpp.llama_batch_init(self.batch_size, 0, 1)
        try:
            for first in range(0, len(window), self.batch_size):
                part = window[first:first + self.batch_size]
                _fill_batch(batch, part, first)
                collector.new_graph()
                rc = llama_cpp.llama_decode(self.ctx, batch)
                if collector.error is not None:
                    raise collector.error
                if rc != 0:
                    raise ImatrixError(path=self.path, problem=self._why(f"llama_decode returned {rc}"),
                                       hint_text="run with EDGELLM_DEBUG=1 to see llama.cpp's log")
                done += len(part)
                if progress is not None:
                    progress(done, total)
        finally:
            llama_cpp.llama_batch_free(batch)
        return done


def _fill_batch(batch, tokens: list[int], first_pos: int) -> None:
    batch.n_tokens = len(tokens)
    for i, token in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, first_pos + i, 1
        batch.seq_id[i][0], batch.logits[i] = 0, 1
