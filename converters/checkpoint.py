"""Open a Hugging Face checkpoint folder without torch: config, safetensors (memory-mapped), tokenizer files.

Only safetensors weights are read. A folder that holds pickle checkpoints (``.bin``/``.pt``/``.pth``/``.ckpt``)
and no safetensors is refused with ``UnsafeCheckpointError``: unpickling runs arbitrary code.
Tensors are listed in the order llama.cpp's converter visits them (shard files sorted by name, tensors
sorted by name within a shard), so our GGUF lists them in the same order.
"""

from __future__ import annotations

import json
import logging
import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import CheckpointError, UnsafeCheckpointError
from edgellm.safetensors import SafetensorsFile, TensorInfo

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INDEX_FILE = "model.safetensors.index.json"
# safetensors dtypes we accept as weights; integer tensors mean a quantized or foreign checkpoint
FLOAT_DTYPES = frozenset({"F32", "F16", "BF16", "F64"})


@dataclass
class Checkpoint:
    """An opened checkpoint folder. ``tensors`` maps each HF tensor name to its file and header entry."""

    path: Path
    config: dict[str, Any]
    files: list[SafetensorsFile]
    tensors: dict[str, tuple[SafetensorsFile, TensorInfo]]
    tokenizer_config: dict[str, Any] = field(default_factory=dict)
    generation_config: dict[str, Any] = field(default_factory=dict)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name][1]

    def raw(self, name: str) -> np.ndarray:
        """The stored array, zero-copy from the memory map (bf16 as uint16 bits)."""
        return self.tensors[name][0].raw(name)

    def release(self, name: str, rows: slice = slice(None)) -> None:
        """Drop a tensor's pages (or those of ``rows``) from this process's resident memory once converted.

        The mapping is read-only and file-backed, so the pages stay in the page cache and a later read
        faults them back in. Without this, RSS grows to the whole checkpoint during a conversion.
        """
        view = self.raw(name)[rows]
        mapping = _mapping_of(view)
        if mapping is None or not hasattr(mmap, "MADV_DONTNEED") or view.size == 0:
            return   # Windows: no madvise; the OS trims the working set itself
        begin = self.info(name).begin + (view.ctypes.data - self.raw(name).ctypes.data)
        start = begin - begin % mmap.PAGESIZE
        mapping.madvise(mmap.MADV_DONTNEED, start, begin + view.nbytes - start)

    def has_file(self, name: str) -> bool:
        return (self.path / name).is_file()

    def read_json(self, name: str) -> dict[str, Any]:
        """A JSON file of the folder ({} when absent). Raises CheckpointError when it is not valid JSON."""
        return read_json(self.path / name, required=False)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _mapping_of(array: np.ndarray) -> mmap.mmap | None:
    """The mmap object a zero-copy array view was made from (numpy keeps it at the end of the .base chain)."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):     # np.frombuffer keeps a memoryview of the mmap
        base = base.obj
    return base if isinstance(base, mmap.mmap) else None


def read_json(path: Path, *, required: bool) -> dict[str, Any]:
    """Parse a JSON object file; {} when absent and not required. Raises CheckpointError otherwise."""
    if not path.is_file():
        if required:
            raise CheckpointError(path=str(path.parent), problem=f"{path.name} is missing")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path=str(path), problem=f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path=str(path), problem=f"expected a JSON object, found {type(data).__name__}")
    return data


def open_checkpoint(model_dir: str | Path) -> Checkpoint:
    """Open ``model_dir``: parse its JSON files and memory-map its safetensors shards.

    Raises:
        CheckpointError: missing folder/config.json, no weights, a corrupt or truncated shard, or an index
            that names tensors or files the shards do not hold.
        UnsafeCheckpointError: the folder has only pickle weights.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(path=str(path), problem="not a directory")
    config = read_json(path / "config.json", required=True)
    shard_names, weight_map = _shard_names(path)
    files = []
    try:
        for name in shard_names:
            files.append(SafetensorsFile(path / name))
        tensors = _index_tensors(files)
        if weight_map:
            _check_index(path, weight_map, tensors)
    except BaseException:
        for f in files:
            f.close()
        raise
    return Checkpoint(path=path, config=config, files=files, tensors=tensors,
                      tokenizer_config=read_json(path / "tokenizer_config.json", required=False),
                      generation_config=_generation_config(path))


def _shard_names(path: Path) -> tuple[list[str], dict[str, str]]:
    """Sorted shard file names and the index's weight map ({} without an index)."""
    index = read_json(path / INDEX_FILE, required=False)
    weight_map = index.get("weight_map") if index else None
    if index and not isinstance(weight_map, dict):
        raise CheckpointError(path=str(path / INDEX_FILE), problem="has no 'weight_map' object")
    if weight_map:
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(path=str(path), problem=f"shards named in {INDEX_FILE} are missing: "
                                                          f"{', '.join(missing)}")
        return names, weight_map
    names = sorted(p.name for p in path.glob("*.safetensors"))
    if names:
        return names, {}
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeCheckpointError(path=str(path), files=pickles)
    raise CheckpointError(path=str(path), problem="no *.safetensors weights found")


def _index_tensors(files: list[SafetensorsFile]) -> dict[str, tuple[SafetensorsFile, TensorInfo]]:
    tensors: dict[str, tuple[SafetensorsFile, TensorInfo]] = {}
    for f in files:
        for name in sorted(f.infos):
            if name in tensors:
                raise CheckpointError(path=str(f.path), problem=f"tensor {name!r} is also in "
                                                                f"{tensors[name][0].path.name}")
            tensors[name] = (f, f.infos[name])
    return tensors


def _check_index(path: Path, weight_map: dict[str, str], tensors: dict) -> None:
    missing = sorted(set(weight_map) - set(tensors))
    extra = sorted(set(tensors) - set(weight_map))
    if missing or extra:
        raise CheckpointError(path=str(path), problem=f"{INDEX_FILE} does not match the shards: "
                                                      f"missing tensors {missing[:5]}, unlisted tensors {extra[:5]}")


def _generation_config(path: Path) -> dict[str, Any]:
    # lenient like llama.cpp: many repositories ship a broken generation_config.json
    try:
        return read_json(path / "generation_config.json", required=False)
    except CheckpointError as exc:
        logger.warning("ignoring %s", exc)
        return {}
