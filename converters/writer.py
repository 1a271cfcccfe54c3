"""Stream tensors into a GGUF file, atomically, a few megabytes at a time.

The header, metadata and every tensor's info are written first (shapes and types come from the plan).
Then each tensor is read from the checkpoint's memory map in blocks of rows, checked for NaN/Inf, cast or
quantized (gguf-py's numpy quantizers, the code llama.cpp's converter runs; every output type is row-wise)
and appended. Tensors with a transform (LLaMA's Q/K permutation, Gemma's norm offset: all small) are
converted whole. So peak memory is bounded by ``CHUNK_ELEMENTS`` and the largest transformed tensor, not by
the embedding table. The file is written as ``OUT.partial`` and renamed when complete; any error or
interrupt removes it.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import struct
from math import prod
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

import gguf
import numpy as np

from edgellm.converters.archs.common import Context
from edgellm.converters.checkpoint import Checkpoint
from edgellm.converters.plan import TensorPlan
from edgellm.errors import CheckpointError, ConvertOutputError, ConvertTypeError

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
F16_MAX = float(np.finfo(np.float16).max)     # 65504: magnitudes from 65520 up become inf in f16
F16_INF_BITS = 0x7C00                          # f16 exponent all ones: inf (NaN never reaches the cast)
CHUNK_ELEMENTS = 1 << 22                       # rows are converted in blocks of about this many values (16 MiB f32)

Progress = Callable[[int, int, str], None]     # (bytes written, total bytes, tensor name)
Chunks = Callable[[TensorPlan], Iterable[np.ndarray]]


class GGUFWriter(gguf.GGUFWriter):
    """gguf-py's writer, packing metadata arrays in one call instead of one ``struct.pack`` per element.

    The bytes are the same; a 262k-token vocabulary (three arrays) took seconds the other way.
    """

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):   # noqa: ANN001 - gguf-py's signature
        if vtype != gguf.GGUFValueType.ARRAY or isinstance(val, (bytes, str)) or not isinstance(val, (list, tuple)) \
                or not val:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        ltype = sub_type if sub_type is not None else gguf.GGUFValueType.get_type(val[0])
        if sub_type is None and any(gguf.GGUFValueType.get_type(v) is not ltype for v in _one_of_each_type(val)):
            raise ValueError("All items in a GGUF array should be of the same type")
        prefix = "<" if self.endianess == gguf.GGUFEndian.LITTLE else ">"
        head = (struct.pack(f"{prefix}I", vtype) if add_vtype else b"") + struct.pack(f"{prefix}IQ", ltype, len(val))
        fmt = self._simple_value_packing.get(ltype)
        if fmt is not None:
            return head + struct.pack(f"{prefix}{len(val)}{fmt}", *val)
        if ltype == gguf.GGUFValueType.STRING:
            length = struct.Struct(f"{prefix}Q").pack
            encoded = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in val]
            return head + b"".join(part for e in encoded for part in (length(len(e)), e))
        return super()._pack_val(val, vtype, add_vtype, sub_type)   # nested arrays: rare and small


def _one_of_each_type(values: Iterable) -> list:
    """One value per distinct Python type in ``values`` (to check an array is homogeneous cheaply)."""
    return list({type(v): v for v in values}.values())


def partial_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".partial")


def apply_calls(writer: gguf.GGUFWriter, calls: Iterable[tuple]) -> None:
    """Run metadata calls ``(method, *args)`` against ``writer``."""
    for method, *args in calls:
        getattr(writer, method)(*args)


@functools.lru_cache(maxsize=1)
def _ggml_casts() -> tuple[Callable, Callable] | None:
    """ggml-cpu's vectorised row casts (fp32 -> fp16, bf16 -> fp32: F16C/AVX on x86, NEON on ARM), or None.

    Both are exact or round to nearest even exactly as numpy's ``astype`` does, so the bytes written are the
    same (the converter goldens check it); numpy's own fp32 -> fp16 cast is about 50x slower and was most of
    an f16 conversion's time. ctypes releases the GIL during the calls.
    """
    try:
        import llama_cpp
        from llama_cpp._ctypes_extensions import load_shared_library

        lib = load_shared_library("ggml-cpu", Path(llama_cpp.__file__).parent / "lib")
        to_f16, from_bf16 = lib.ggml_cpu_fp32_to_fp16, lib.ggml_cpu_bf16_to_fp32
    except (ImportError, OSError, AttributeError, RuntimeError) as exc:   # no llama.cpp build: numpy casts
        logger.debug("ggml-cpu row casts unavailable (%s): numpy casts", exc)
        return None
    for fn in (to_f16, from_bf16):
        fn.restype, fn.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return to_f16, from_bf16


def to_f16(array: np.ndarray) -> np.ndarray:
    """``array.astype(np.float16)`` (round to nearest even, overflow to inf), through ggml-cpu when it loads."""
    casts = _ggml_casts()
    if casts is None or array.dtype != np.float32:
        return array.astype(np.float16)
    src = np.ascontiguousarray(array)
    out = np.empty(src.shape, np.float16)
    casts[0](src.ctypes.data, out.ctypes.data, src.size)
    return out


def working_array(raw: np.ndarray, dtype: str) -> np.ndarray:
    """The values as llama.cpp's converter holds them: f16 stays f16, everything else becomes f32."""
    if dtype == "BF16":
        casts = _ggml_casts()
        if casts is not None:
            src = np.ascontiguousarray(raw)
            wide = np.empty(src.shape, np.float32)
            casts[1](src.ctypes.data, wide.ctypes.data, src.size)
            return wide
        wide = raw.astype(np.uint32)          # bf16 bits -> the high half of f32, shifted in place
        wide <<= 16                           # (what bf16_to_f32 computes, without a second temporary)
        return wide.view(np.float32)
    if dtype == "F16":
        return raw
    return raw.astype(np.float32, copy=False)


def first_bad_value(array: np.ndarray) -> float | None:
    """The first NaN or infinite value of ``array``, or None when all are finite."""
    bad = ~np.isfinite(array)
    return float(array.reshape(-1)[np.argmax(bad)]) if bad.any() else None


def row_blocks(array: np.ndarray) -> Iterator[np.ndarray]:
    """Views of consecutive rows of ``array`` holding about CHUNK_ELEMENTS values each (1-D: the whole)."""
    if array.ndim < 2:
        yield array
        return
    step = max(1, CHUNK_ELEMENTS // prod(array.shape[1:]))
    for start in range(0, array.shape[0], step):
        yield array[start:start + step]


def tensor_chunks(ckpt: Checkpoint, plan: TensorPlan, ctx: Context) -> Iterator[np.ndarray]:
    """The stored bytes of one planned tensor, as consecutive arrays whose ``tofile`` writes them.

    Raises:
        CheckpointError: the tensor holds NaN or Inf.
        ConvertTypeError: an F16 tensor would overflow (values beyond +-65504).
    """
    if plan.data is not None:
        yield gguf.quants.quantize(plan.data, plan.qtype)
        return
    raw = ckpt.raw(plan.source)[:plan.shape[0]] if plan.shape else ckpt.raw(plan.source)
    transform = plan.row.transform if plan.row is not None else None
    start = 0
    for block in [raw] if transform is not None else row_blocks(raw):
        yield convert_block(ckpt, plan, ctx, block, transform)
        stop = start + (len(block) if block.ndim else 1)
        ckpt.release(plan.source, slice(start, stop))     # written: its pages may leave memory
        start = stop


def convert_block(ckpt: Checkpoint, plan: TensorPlan, ctx: Context, block: np.ndarray, transform) -> np.ndarray:
    """Rows of one tensor: widened, checked, transformed, then cast or quantized to ``plan.qtype``."""
    work = working_array(block, ckpt.info(plan.source).dtype)
    if (bad := first_bad_value(work)) is not None:
        raise CheckpointError(path=str(ckpt.path), problem=f"tensor {plan.source!r} contains {bad} values; the "
                                                           "checkpoint is corrupt or was saved after a diverged run")
    if transform is not None:
        work = transform(work, ctx)
    if plan.qtype != Q.F16 or work.dtype == np.float16:
        return gguf.quants.quantize(work, plan.qtype)
    half = to_f16(work)
    if half.size and (half.view(np.uint16) & 0x7FFF).max() >= F16_INF_BITS:   # finite input: inf = overflow
        raise ConvertTypeError(type="f16", problem=f"tensor {plan.source!r} has values up to "
                                                   f"{np.abs(work).max():g}, beyond the f16 range +-{F16_MAX:g}",
                               hint_text="convert with --type bf16 or --type f32")
    return half


def write_tensor(writer: gguf.GGUFWriter, fout: BinaryIO, plan: TensorPlan, chunks: Iterable[np.ndarray]) -> None:
    """Append one tensor's data, aligned and padded the way GGUFWriter.write_tensor_data does it."""
    writer.write_padding(fout, fout.tell())
    written = 0
    for chunk in chunks:
        chunk.tofile(fout)
        written += chunk.nbytes
    if written != plan.nbytes:
        raise AssertionError(f"{plan.name}: planned {plan.nbytes} bytes, produced {written}")
    writer.write_padding(fout, written)


def write_gguf(out_path: Path, arch_name: str, calls: list[tuple], plans: list[TensorPlan], chunks: Chunks,
               progress: Progress | None = None) -> int:
    """Write a GGUF file with metadata ``calls`` and the ``plans`` tensors (data from ``chunks(plan)``).

    Returns the file size in bytes.

    Raises:
        ConvertOutputError: the output cannot be written (disk full, permissions); nothing is left behind.
        Whatever ``chunks`` raises (the partial file is removed first).
    """
    out_path = Path(out_path)
    partial = partial_path(out_path)
    writer = GGUFWriter(path=None, arch=arch_name)
    apply_calls(writer, calls)
    for plan in plans:
        # element shape + raw type: the writer stores the shape as given
        writer.add_tensor_info(plan.name, plan.shape, np.dtype(np.float32), plan.nbytes, raw_dtype=plan.qtype)
    total, done = sum(p.nbytes for p in plans), 0
    try:
        writer.write_header_to_file(path=partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for plan in plans:
            write_tensor(writer, writer.fout[0], plan, chunks(plan))
            done += plan.nbytes
            if progress is not None:
                progress(done, total, plan.name)
        writer.close()
        os.replace(partial, out_path)
    except OSError as exc:
        _discard(writer, partial)
        problem = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise ConvertOutputError(path=str(out_path), problem=problem) from None
    except BaseException:
        _discard(writer, partial)
        raise
    return out_path.stat().st_size


def write_skeleton_gguf(out_path: Path, arch_name: str, calls: list[tuple], plans: list[TensorPlan]) -> int:
    """The header ``write_gguf`` would write, with a sparse data region of the right length and no data.

    llama.cpp's quantizer reads only headers in dry-run mode, so this gives exact per-type sizes of a model
    without converting it. Returns the (apparent) file size in bytes.
    """
    writer = GGUFWriter(path=None, arch=arch_name)
    apply_calls(writer, calls)
    for plan in plans:
        writer.add_tensor_info(plan.name, plan.shape, np.dtype(np.float32), plan.nbytes, raw_dtype=plan.qtype)
    writer.write_header_to_file(path=out_path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    handle = writer.fout[0]
    alignment = writer.data_alignment
    data_start = -(-handle.tell() // alignment) * alignment
    size = data_start + sum(-(-p.nbytes // alignment) * alignment for p in plans)
    handle.truncate(size)   # sparse: nothing is written
    writer.close()
    return size


def _discard(writer: gguf.GGUFWriter, partial: Path) -> None:
    for f in writer.fout or []:
        try:
            f.close()
        except OSError:
            pass   # closing a file on a full disk can fail again; it is deleted next
    partial.unlink(missing_ok=True)
