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

import errno
import logging
import os
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
F16_MAX = float(np.finfo(np.float16).max)     # 65504: larger magnitudes become inf in f16
CHUNK_ELEMENTS = 1 << 22                       # rows are converted in blocks of about this many values (16 MiB f32)

Progress = Callable[[int, int, str], None]     # (bytes written, total bytes, tensor name)
Chunks = Callable[[TensorPlan], Iterable[np.ndarray]]


def partial_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".partial")


def apply_calls(writer: gguf.GGUFWriter, calls: Iterable[tuple]) -> None:
    """Run metadata calls ``(method, *args)`` against ``writer``."""
    for method, *args in calls:
        getattr(writer, method)(*args)


def working_array(raw: np.ndarray, dtype: str) -> np.ndarray:
    """The values as llama.cpp's converter holds them: f16 stays f16, everything else becomes f32."""
    if dtype == "BF16":
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
    if plan.qtype == Q.F16 and work.dtype != np.float16 and work.size and (peak := np.abs(work).max()) > F16_MAX:
        raise ConvertTypeError(type="f16", problem=f"tensor {plan.source!r} has values up to {peak:g}, beyond "
                                                   f"the f16 range +-{F16_MAX:g}",
                               hint_text="convert with --type bf16 or --type f32")
    return gguf.quants.quantize(work, plan.qtype)


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
    writer = gguf.GGUFWriter(path=None, arch=arch_name)
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


def _discard(writer: gguf.GGUFWriter, partial: Path) -> None:
    for f in writer.fout or []:
        try:
            f.close()
        except OSError:
            pass   # closing a file on a full disk can fail again; it is deleted next
    partial.unlink(missing_ok=True)
