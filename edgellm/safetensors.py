"""Read safetensors through memory maps and write them atomically, without torch.

The format: 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``
(offsets relative to the end of the header), then raw little-endian tensor bytes. We read it by hand
because the ``safetensors`` package's numpy API copies every tensor and cannot represent bf16.
bf16 tensors are returned as their raw ``uint16`` bits; ``bf16_to_f32`` widens them exactly.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgellm.errors import CheckpointError

# safetensors dtype -> numpy dtype of the stored bytes (bf16 kept as its bit pattern)
DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NUMPY_TO_ST = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<f8"): "F64",
                np.dtype("<i8"): "I64", np.dtype("<i4"): "I32", np.dtype("i1"): "I8", np.dtype("u1"): "U8"}
_MAX_HEADER = 100 * 2**20   # the reference implementation refuses headers over 100 MB


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str                 # safetensors dtype name: "F32", "F16", "BF16", ...
    shape: tuple[int, ...]
    begin: int                 # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """One memory-mapped .safetensors file. Tensors are zero-copy views; validate() checks the layout."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self.infos, data_start = _read_header(f, size, self.path)
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except OSError as exc:
            raise CheckpointError(path=str(self.path), problem=str(exc)) from None
        self.metadata = self.infos.pop("__metadata__", None)
        self.data_start = data_start

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def names(self) -> list[str]:
        return list(self.infos)

    def raw(self, name: str) -> np.ndarray:
        """The stored array, zero-copy (bf16 as uint16 bits)."""
        info = self.infos[name]
        return np.frombuffer(self._map, dtype=DTYPES[info.dtype], count=_count(info.shape),
                             offset=info.begin).reshape(info.shape)

    def float32(self, name: str) -> np.ndarray:
        """The tensor as float32 (a new array unless it is stored as F32)."""
        info = self.infos[name]
        array = self.raw(name)
        return bf16_to_f32(array) if info.dtype == "BF16" else array.astype(np.float32, copy=False)

    def close(self) -> None:
        """Unmap the file. While arrays from ``raw()`` are still alive the map stays until they are freed."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:     # views still exported: the mapping lives on with them
                pass

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _count(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def _read_header(f, size: int, path: Path) -> tuple[dict, int]:
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(path=str(path), problem=problem)

    head = f.read(8)
    if len(head) < 8:
        raise bad(f"file is {size} bytes, too short for a safetensors header (truncated?)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > min(_MAX_HEADER, size - 8):
        raise bad(f"header length {header_len} exceeds the file size {size} (corrupt or truncated)")
    try:
        header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"header is not valid JSON ({exc}): corrupt file") from None
    data_start = 8 + header_len
    infos: dict = {}
    for name, entry in header.items():
        if name == "__metadata__":
            infos[name] = entry
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has a malformed header entry: {entry!r}") from None
        if dtype not in DTYPES:
            raise bad(f"tensor {name!r} has unsupported dtype {dtype}")
        if end - begin != _count(shape) * DTYPES[dtype].itemsize or begin > end:
            raise bad(f"tensor {name!r}: {end - begin} bytes do not hold shape {list(shape)} of {dtype}")
        if data_start + end > size:
            raise bad(f"tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes (truncated)")
        infos[name] = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
    return infos, data_start


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen bf16 bit patterns (uint16) to float32 exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 bit patterns (uint16), to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(values)
    return np.where(nan, (bits >> 16) | 0x40, rounded).astype(np.uint16)


def write(path: str | Path, tensors: dict[str, np.ndarray], dtypes: dict[str, str] | None = None,
          metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` atomically (temporary name, then rename).

    ``dtypes`` marks arrays that hold raw bits of another dtype, e.g. ``{"w": "BF16"}`` for a uint16 array.
    """
    dtypes = dtypes or {}
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    arrays = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        st_dtype = dtypes.get(name) or _NUMPY_TO_ST[array.dtype.newbyteorder("<")]
        header[name] = {"dtype": st_dtype, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)     # align the data section to 8 bytes, as the reference writer does
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for array in arrays:
                f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
