"""Quantize a GGUF file with llama.cpp's own quantizer (``llama_model_quantize`` through llama-cpp-python).

llama.cpp owns the recipes (which tensor gets which type in a Q4_K_M file); this module adds what the C call lacks:
checks that would otherwise abort the Python process (a 256-wide k-quant block forced on a 640-wide row, an IQ2 type
with no importance data), its per-tensor log turned into progress and kept for the debug log, the automatic
type fallbacks it makes reported instead of hidden, and an output that appears only when complete.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import re
import struct
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from edgellm.converters import quant_types as qt
from edgellm.converters.quant_types import (TOKEN_EMBD, ExplicitTypes, TensorInfo, check_explicit_types,
                                            resolve_types)
from edgellm.errors import ImatrixError, ImatrixRequiredError, QuantizeError, UsageError

if TYPE_CHECKING:
    from edgellm.converters.imatrix import Imatrix

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]   # (tensors done, tensors in all, tensor name)
IN_MEMORY = "(computed in memory)"   # names an Imatrix passed as an object in messages
AUTO = "auto"                        # imatrix="auto": compute one from the bundled calibration text

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
# GGUF value type -> struct format of one value (8 = string, 9 = array are handled apart)
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


# ---------------------------------------------------------------------------------------------------------------
# GGUF tensor infos (gguf.GGUFReader parses every vocabulary string into numpy views: 11 s on Gemma's 262k tokens;
# walking the header with struct takes well under a second)
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GgufHeader:
    metadata: dict[str, object]   # scalar and string values; arrays are kept as their length only
    tensors: list[TensorInfo]
    data_start: int               # file offset of the tensor data (TensorInfo.offset counts from here)


def read_gguf_header(path: str | Path) -> GgufHeader:
    """Read the metadata scalars and tensor infos of a GGUF file without touching its tensor data.

    Raises:
        QuantizeError: when the file is not a GGUF file or its header is cut short.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            return _parse_header(buf)
        except (struct.error, ValueError, KeyError) as exc:
            raise QuantizeError(path=str(path), problem=f"not a readable GGUF file ({exc})") from None


def _parse_header(buf) -> GgufHeader:
    if buf[:4] != GGUF_MAGIC:
        raise ValueError("bad magic")
    _version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    pos = 24
    metadata: dict[str, object] = {}
    for _ in range(n_kv):
        key, pos = _read_string(buf, pos)
        (vtype,), pos = struct.unpack_from("<I", buf, pos), pos + 4
        metadata[key], pos = _read_value(buf, pos, vtype)
    tensors = []
    for _ in range(n_tensors):
        name, pos = _read_string(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        ne = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        pos += 4 + 8 * n_dims
        ttype, offset = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        tensors.append(TensorInfo(name, tuple(int(n) for n in ne), qt.ggml_type_by_value(ttype), offset))
    alignment = int(metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))   # type: ignore[arg-type]
    return GgufHeader(metadata, tensors, -(-pos // alignment) * alignment)


def _read_string(buf, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8", errors="replace"), pos + 8 + n


def _read_value(buf, pos: int, vtype: int) -> tuple[object, int]:
    if vtype == _GGUF_STRING:
        return _read_string(buf, pos)
    if vtype == _GGUF_ARRAY:
        etype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype in _GGUF_SCALARS:   # fixed-size items: skip them at once
            return count, pos + count * struct.calcsize(_GGUF_SCALARS[etype])
        for _ in range(count):
            _, pos = _read_value(buf, pos, etype)
        return count, pos
    fmt = _GGUF_SCALARS[vtype]
    return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)


def check_imatrix_matches(tensors: Sequence[TensorInfo], means: dict[str, np.ndarray], path: str) -> None:
    """Refuse an importance matrix made for another model: no shared tensor names, or rows of another width.

    Raises:
        ImatrixError: naming the first mismatch.
    """
    by_name = {t.name: t for t in tensors}
    shared = [n for n in means if n in by_name]
    if means and not shared:
        raise ImatrixError(path=path, problem=f"none of its {len(means)} entries names a tensor of this model "
                                              f"(first entry: {next(iter(means))})")
    for name in shared:
        info = by_name[name]
        expected = info.ne[0] * (info.ne[2] if len(info.ne) > 2 else 1)   # one row of sums per expert
        if means[name].size != expected and name not in TOKEN_EMBD:
            raise ImatrixError(path=path, problem=f"entry {name} has {means[name].size} values, the tensor needs "
                                                  f"{expected}")


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp's log: captured, parsed into progress and fallbacks, kept for the debug log
# ---------------------------------------------------------------------------------------------------------------

# "[  12/ 236]                blk.1.attn_k.weight - [  640,   256,     1,     1], type =   q5_0, ..."
_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\S+),(.*)$")
_DRY_TARGET = re.compile(r"MiB \((\S+)\)\s*$")
_CONVERTING = re.compile(r"converting to (\S+) ")
# "warning: blk.0.ffn_up.weight - ncols 640 not divisible by 256 (required for type q4_K) -> falling back to q5_0"
_FALLBACK = re.compile(r"warning: (\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\)"
                       r".*-> falling back to\s+(\S+)")
_LOG_ERROR_LEVEL = 4   # GGML_LOG_LEVEL_ERROR (ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5)
_LOG_CONT_LEVEL = 5    # GGML_LOG_LEVEL_CONT: continues the previous message


@dataclass
class LlamaLog:
    """Lines llama.cpp logged while captured (level, text), and the error lines among them."""

    lines: list[tuple[int, str]] = field(default_factory=list)
    on_line: Callable[[int, str], None] | None = None
    error: BaseException | None = None    # the first exception ``on_line`` raised (C cannot carry it)
    _partial: str = ""
    _level: int = 0

    def feed(self, level: int, text: str) -> None:
        """Add one message; llama.cpp builds a line from several same-level messages, ended by a newline."""
        if level != _LOG_CONT_LEVEL and level != self._level:
            self.flush()   # an error cuts into a half-written INFO line: keep them apart
        if level != _LOG_CONT_LEVEL:
            self._level = level
        self._partial += text
        while "\n" in self._partial:
            line, self._partial = self._partial.split("\n", 1)
            self._emit(line)

    def flush(self) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = ""

    def _emit(self, line: str) -> None:
        self.lines.append((self._level, line))
        if self.on_line is not None and self.error is None:
            try:
                self.on_line(self._level, line)
            except BaseException as exc:   # noqa: BLE001 - re-raised by the caller once llama.cpp returns
                self.error = exc

    @property
    def errors(self) -> list[str]:
        """Error lines with text in them (llama.cpp frames some errors with rows of '=')."""
        return [text.strip() for level, text in self.lines if level == _LOG_ERROR_LEVEL and text.strip(" =\n")]


# llama.cpp has one process-wide logger. One dispatcher, created once and never freed, is installed while any
# capture is active and feeds the innermost capture of the logging thread (else the newest): captures may then
# end in any order (a cancelled quantization finishes on its worker thread later) without ever leaving
# llama.cpp a pointer to a freed callback.
_LOG_LOCK = threading.Lock()
_SINKS: list[tuple[int, LlamaLog]] = []   # (thread id, capture), oldest first
_SAVED: list = []                          # [callback, user data] to restore when the last capture ends
_DISPATCHER: list = []                     # [the C callback], kept alive for the life of the process


def _dispatch(level: int, text: bytes | None, _user_data) -> None:
    sinks = list(_SINKS)
    if not sinks:
        return
    me = threading.get_ident()
    sink = next((s for tid, s in reversed(sinks) if tid == me), sinks[-1][1])
    try:   # an exception must never cross back into C: keep it for the caller to raise
        sink.feed(level, (text or b"").decode("utf-8", errors="replace"))
    except BaseException as exc:   # noqa: BLE001 - KeyboardInterrupt included
        sink.error = sink.error or exc


@contextmanager
def capture_llama_log(on_line: Callable[[int, str], None] | None = None) -> Iterator[LlamaLog]:
    """Route llama.cpp/ggml logging into a ``LlamaLog`` while the block runs, then restore the previous logger.

    Lines are also sent to this module's logger at DEBUG, so ``EDGELLM_DEBUG=1`` shows them. Captures nest and
    may overlap across threads; a line goes to the innermost capture of the thread that logged it.
    """
    import llama_cpp

    captured = LlamaLog(on_line=on_line)
    with _LOG_LOCK:
        if not _DISPATCHER:
            _DISPATCHER.append(llama_cpp.llama_log_callback(_dispatch))
        if not _SINKS:
            old_callback, old_user_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
            llama_cpp.llama_log_get(ctypes.byref(old_callback), ctypes.byref(old_user_data))
            _SAVED[:] = [old_callback, old_user_data]
            llama_cpp.llama_log_set(_DISPATCHER[0], None)
        _SINKS.append((threading.get_ident(), captured))
    try:
        yield captured
    finally:
        with _LOG_LOCK:
            _SINKS[:] = [(tid, s) for tid, s in _SINKS if s is not captured]
            if not _SINKS:
                llama_cpp.llama_log_set(*_SAVED)
        captured.flush()
        for _, line in captured.lines:
            log.debug("llama.cpp: %s", line)


@dataclass(frozen=True)
class Fallback:
    """A type llama.cpp changed on its own because the tensor's rows do not split into its blocks."""

    tensor: str
    n_per_row: int
    wanted: str
    used: str


def parse_fallbacks(lines: Sequence[str]) -> list[Fallback]:
    found = (_FALLBACK.search(line) for line in lines)
    return [Fallback(m[1], int(m[2]), m[4].upper(), m[5].upper()) for m in found if m]


def _progress_relay(progress: Progress | None) -> Callable[[int, str], None]:
    def on_line(_level: int, line: str) -> None:
        match = _TENSOR_LINE.match(line)
        if match and progress is not None:
            progress(int(match[1]), int(match[2]), match[3])
    return on_line


def planned_types(lines: Sequence[str]) -> dict[str, str]:
    """Tensor name -> ggml type, from the per-tensor lines of a run (dry or real)."""
    plan = {}
    for line in lines:
        match = _TENSOR_LINE.match(line)
        if not match:
            continue
        rest = match[5]
        target = _DRY_TARGET.search(rest) or _CONVERTING.search(rest)
        plan[match[3]] = (target[1] if target else match[4]).upper()
    return plan


# ---------------------------------------------------------------------------------------------------------------
# The C call
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class _CParams:
    """llama_model_quantize_params plus the C arrays it points into (kept alive for the call)."""

    params: object
    keep: list = field(default_factory=list)


def _c_params(ftype: qt.FileType, types: ExplicitTypes, means: dict[str, np.ndarray] | None,
              imatrix_meta: dict[str, str | int], allow_requantize: bool, n_threads: int | None,
              dry_run: bool) -> _CParams:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype.ftype
    p.nthread = n_threads or 0   # 0: llama.cpp uses std::thread::hardware_concurrency()
    p.allow_requantize = allow_requantize
    p.dry_run = dry_run
    if types.output:
        p.output_tensor_type = types.output.value
    if types.embedding:
        p.token_embedding_type = types.embedding.value
    out = _CParams(p)
    if types.overrides:
        arr = (llama_cpp.llama_model_tensor_override * (len(types.overrides) + 1))()
        for slot, (pattern, gtype) in zip(arr, types.overrides):
            slot.pattern, slot.type = pattern.encode(), gtype.value
        arr[-1].pattern, arr[-1].type = None, llama_cpp.GGML_TYPE_COUNT   # terminator, as quantize.cpp writes it
        p.tt_overrides, out.keep = arr, out.keep + [arr]
    if means:
        _attach_imatrix(out, means, imatrix_meta)
    return out


def _attach_imatrix(out: _CParams, means: dict[str, np.ndarray], meta: dict[str, str | int]) -> None:
    import llama_cpp

    arr = (llama_cpp.llama_model_imatrix_data * (len(means) + 1))()
    for slot, (name, values) in zip(arr, means.items()):
        values = np.ascontiguousarray(values, dtype=np.float32)
        out.keep.append(values)
        slot.name = name.encode()
        slot.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        slot.size = values.size
    arr[-1].name = None   # terminator: name == NULL
    kv = (llama_cpp.llama_model_kv_override * (len(meta) + 1))()
    for slot, (key, value) in zip(kv, meta.items()):
        slot.key = key.encode()[:127]
        if isinstance(value, int):
            slot.tag, slot.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, value
        else:
            slot.tag, slot.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()[:127]
    kv[-1].key = b""   # terminator: key[0] == 0
    out.params.imatrix, out.params.kv_overrides = arr, kv
    out.keep += [arr, kv]


def _run_in_thread(src: Path, dst: Path, cparams: _CParams, on_line: Callable[[int, str], None]
                   ) -> tuple[int, LlamaLog]:
    """Call llama_model_quantize on a worker thread, its log captured, so Ctrl+C reaches this thread at once.

    llama.cpp cannot be stopped midway: after an interrupt the worker finishes on its own, still captured (no log
    spills onto the terminal), then removes its output.
    """
    import llama_cpp

    state: dict[str, object] = {"rc": -1, "cancelled": False, "log": LlamaLog()}

    def relay(level: int, line: str) -> None:   # nobody is listening after a cancel
        if not state["cancelled"]:
            on_line(level, line)

    finished = threading.Event()

    def work() -> None:
        try:
            with capture_llama_log(relay) as captured:
                state["log"] = captured
                state["rc"] = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                                             ctypes.byref(cparams.params))
        finally:
            if state["cancelled"]:
                dst.unlink(missing_ok=True)
            finished.set()

    worker = threading.Thread(target=work, name="llama_model_quantize", daemon=True)
    worker.start()
    try:   # Event.wait, not Thread.join: Ctrl+C inside join can mark a running thread stopped (Python < 3.12)
        while not finished.wait(0.1):
            pass
    except BaseException:
        state["cancelled"] = True
        raise
    return int(state["rc"]), state["log"]   # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantizeResult:
    """What a quantization produced (or, for a dry run, would produce)."""

    path: Path | None                  # None for a dry run
    type: str                          # file type name, e.g. "Q4_K_M"
    size_bytes: int                    # file size; for a dry run the tensor data plus the source's header
    bits_per_weight: float             # tensor data bits / weights, as llama.cpp reports it
    tensor_types: dict[str, int]       # ggml type -> number of tensors
    seconds: float
    fallbacks: list[Fallback] = field(default_factory=list)
    imatrix_entries: int = 0           # weight matrices with importance data
    imatrix_tokens: int = 0            # tokens the importance matrix was computed on (0 if unknown)
    dry_run: bool = False
    log: list[str] = field(default_factory=list, repr=False)


def quantize_gguf(src_gguf: str | Path, dst_gguf: str | Path, type: str, *,   # noqa: A002 - the CLI's name
                  imatrix: "Imatrix | str | Path | None" = None, output_type: str | None = None,
                  embedding_type: str | None = None, overrides: dict[str, str] | Sequence[tuple[str, str]] | None = None,
                  allow_requantize: bool = False, n_threads: int | None = None, progress: Progress | None = None,
                  dry_run: bool = False) -> QuantizeResult:
    """Quantize ``src_gguf`` into ``dst_gguf`` as llama.cpp file type ``type`` (e.g. ``"Q4_K_M"``).

    ``output_type``/``embedding_type`` force a ggml type on output.weight / token_embd.weight; ``overrides`` maps
    regular expressions (searched in tensor names, first match wins) to ggml types. ``imatrix`` is an ``Imatrix``,
    the path of an imatrix file (GGUF or legacy .dat), or ``"auto"`` to compute one on ``src_gguf`` from the
    bundled calibration text. ``progress(done, total, tensor_name)`` is called from a worker thread after each
    tensor. ``dry_run`` computes the types and size without writing anything.

    Returns:
        QuantizeResult: path, size, bits per weight, tensors per ggml type, seconds, llama.cpp's own fallbacks.

    Raises:
        UnknownQuantTypeError: an unknown file or tensor type name.
        QuantTypeRowError: a forced type whose blocks do not divide a tensor's rows.
        ImatrixRequiredError: the type needs an importance matrix and none (or one without that tensor) was given.
        ImatrixError: the importance matrix is unreadable or belongs to another model.
        UsageError: overrides with a float file type (llama.cpp ignores them there) or a bad pattern.
        QuantizeError: llama.cpp failed (its error lines are in the message); no output file is left.
    """
    start = time.perf_counter()
    src, dst = Path(src_gguf), Path(dst_gguf)
    if not dry_run and not dst.parent.is_dir():
        raise QuantizeError(path=str(src), problem=f"the output folder {dst.parent} does not exist")
    ftype = qt.file_type(type)
    types = resolve_types(output_type, embedding_type, overrides)
    if types.overrides and ftype.main in qt.FLOAT_TYPES:
        raise UsageError(problem=f"tensor-type overrides have no effect with file type {ftype.name}: llama.cpp "
                                 "applies them only to quantized file types",
                         hint_text="pick a quantized type (e.g. Q8_0) as the base, or drop the overrides")
    header = read_gguf_header(src)
    matrix, source = _load_imatrix(imatrix, src, ftype, n_threads)
    means, meta = _imatrix_inputs(matrix, source, header.tensors)
    check_explicit_types(header.tensors, types, frozenset(means or ()))
    cparams = _c_params(ftype, types, means, meta, allow_requantize, n_threads, dry_run)
    lines = _quantize_c(src, dst, cparams, progress, dry_run)
    fallbacks = parse_fallbacks(lines)
    for fb in fallbacks:
        log.info("llama.cpp put %s in %s: %d-wide rows do not fit %s blocks", fb.tensor, fb.used, fb.n_per_row, fb.wanted)
    return _result(None if dry_run else dst, ftype, header, lines, fallbacks, matrix, time.perf_counter() - start)


def _load_imatrix(imatrix, src: Path, ftype: qt.FileType, n_threads: int | None) -> tuple["Imatrix | None", str]:
    """The importance matrix to use and how to name it: given, read from a file, or computed for "auto"."""
    if imatrix is None:
        if ftype.needs_imatrix:
            raise ImatrixRequiredError(type=ftype.name, reason=f"llama.cpp refuses {ftype.name} without one "
                                       "(very low-bit weights quantized blindly are garbage)")
        return None, ""
    from edgellm.converters.imatrix import Imatrix, compute_imatrix, load_imatrix

    if isinstance(imatrix, Imatrix):
        return imatrix, IN_MEMORY
    if str(imatrix) == AUTO:
        matrix = compute_imatrix(src, n_threads=n_threads)
        log.info("importance matrix computed on %d tokens of the bundled calibration text", matrix.n_tokens)
        return matrix, IN_MEMORY
    return load_imatrix(imatrix), str(imatrix)


def _imatrix_inputs(matrix: "Imatrix | None", source: str, tensors: Sequence[TensorInfo]
                    ) -> tuple[dict[str, np.ndarray] | None, dict[str, str | int]]:
    """Per-tensor mean squares for llama.cpp and the quantize.imatrix.* metadata llama-quantize also writes."""
    if matrix is None:
        return None, {}
    means = matrix.mean_squares()
    check_imatrix_matches(tensors, means, source)
    meta: dict[str, str | int] = {"quantize.imatrix.entries_count": len(means),
                                  "quantize.imatrix.chunks_count": matrix.chunk_count}
    if matrix.datasets:
        meta["quantize.imatrix.dataset"] = matrix.datasets[0]
    if source != IN_MEMORY:
        meta["quantize.imatrix.file"] = Path(source).name
    return means, meta


def _quantize_c(src: Path, dst: Path, cparams: _CParams, progress: Progress | None, dry_run: bool) -> list[str]:
    """Run llama.cpp into ``dst.partial`` and rename it to ``dst`` when complete; return its log lines."""
    tmp = dst.with_name(dst.name + ".partial")
    try:
        rc, captured = _run_in_thread(src, tmp, cparams, _progress_relay(progress))
        if captured.error is not None:   # e.g. a progress callback that cancels with KeyboardInterrupt
            raise captured.error
        if rc != 0:
            raise QuantizeError(path=str(src), problem=_failure(captured.errors, rc))
        if not dry_run:
            os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return [text for _, text in captured.lines]


# llama.cpp failure text -> what to do about it, appended to the reason
_NEXT_STEPS = {
    "requantizing from type": "the source is already quantized: pass allow_requantize=True (--allow-requantize), "
                              "or better, start from the F16/BF16 model",
    "imatrix size": "the importance matrix was computed on another model",
}


def _failure(errors: list[str], rc: int) -> str:
    """llama.cpp's reason: the text of its last error line ("llama_model_quantize: failed to quantize: ...")."""
    if not errors:
        return f"llama_model_quantize returned {rc}"
    reason = errors[-1].split("failed to quantize: ", 1)[-1]
    steps = [step for key, step in _NEXT_STEPS.items() if key in reason]
    return "; ".join([reason, *steps])


def _result(dst: Path | None, ftype: qt.FileType, header: GgufHeader, lines: list[str],
            fallbacks: list[Fallback], matrix: "Imatrix | None", seconds: float) -> QuantizeResult:
    if dst is not None:
        infos = read_gguf_header(dst).tensors
        size = dst.stat().st_size
    else:   # dry run: the planned type of each tensor, sized with the source's shapes
        plan = planned_types(lines)
        infos = [TensorInfo(t.name, t.ne, plan.get(t.name, t.type)) for t in header.tensors]
        size = header.data_start + sum(_padded(t.n_bytes) for t in infos)   # the header barely changes
    n_weights = sum(t.n_elements for t in infos)
    bpw = 8.0 * sum(t.n_bytes for t in infos) / max(n_weights, 1)
    counts = dict(sorted(Counter(t.type for t in infos).items()))
    return QuantizeResult(dst, ftype.name, size, bpw, counts, seconds, fallbacks,
                          len(matrix.sums) if matrix else 0, matrix.n_tokens if matrix else 0, dst is None, lines)


def _padded(n: int) -> int:
    return -(-n // GGUF_DEFAULT_ALIGNMENT) * GGUF_DEFAULT_ALIGNMENT
