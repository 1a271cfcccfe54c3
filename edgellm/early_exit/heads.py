"""Exit heads, in numpy: an affine map from the hidden state after layer E to the final hidden state (fitted
by least squares), the model's final RMS norm, and a reduced-vocabulary output head (the V most frequent
tokens' rows of the output matrix). Saved as one ``.npz``; the rows are read from the GGUF once.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

HEAD_FORMAT = 1
OUTPUT_TENSORS = ("output.weight", "token_embd.weight")   # untied head first; tied models use the embedding
NORM_TENSOR = "output_norm.weight"


def fit_affine(x: np.ndarray, y: np.ndarray, ridge: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares affine map ``y ≈ x @ w + b``.

    x: (n, d_in), y: (n, d_out). ``ridge`` adds ridge * n * I to the normal equations (not on the bias).
    Returns (w (d_in, d_out) float32, b (d_out,) float32).
    """
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mx, my = x64.mean(axis=0), y64.mean(axis=0)
    xc, yc = x64 - mx, y64 - my          # centring solves for the bias exactly
    if ridge > 0:
        gram = xc.T @ xc + ridge * len(x64) * np.eye(x64.shape[1])
        w = np.linalg.solve(gram, xc.T @ yc)
    else:
        w = np.linalg.lstsq(xc, yc, rcond=None)[0]
    return w.astype(np.float32), (my - mx @ w).astype(np.float32)


def rank_vocab(tokens: Iterable[int], n_vocab: int, first: Sequence[int | None] = ()) -> np.ndarray:
    """All token ids, ``first`` ones first (None entries, e.g. a vocabulary without an end-of-turn token, are
    skipped), then by falling frequency in ``tokens``; ties and unseen ids keep id order. Returns (n_vocab,)
    int64."""
    counts = Counter(int(t) for t in tokens)
    seen = sorted(counts, key=lambda t: (-counts[t], t))
    head = list(dict.fromkeys([int(t) for t in first if t is not None] + seen))
    rest = np.setdiff1d(np.arange(n_vocab), np.asarray(head, np.int64), assume_unique=False)
    return np.concatenate([np.asarray(head, np.int64), rest])


def rms_norm(h: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """llama.cpp's RMS norm: h / sqrt(mean(h²) + eps) * weight (Gemma's +1 is already in the GGUF weight)."""
    h = np.asarray(h, np.float32)
    return h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + eps) * weight


@dataclass(frozen=True)
class ExitHead:
    """What turns a hidden state into draft logits.

    ``exit_layer`` E counts the blocks run (E == n_layers: full depth, the hidden state is already normed and
    only the reduced head applies). Below full depth, ``w``/``b`` map the residual stream after block E to the
    final residual stream, then ``norm_weight`` normalises it.
    """

    exit_layer: int
    n_layers: int
    vocab_ids: np.ndarray                  # (V,) int64 token id of each head row
    rows: np.ndarray                       # (V, n_embd) float32 output-matrix rows
    w: np.ndarray | None = None            # (n_embd, n_embd) float32, None at full depth
    b: np.ndarray | None = None            # (n_embd,) float32
    norm_weight: np.ndarray | None = None  # (n_embd,) float32
    norm_eps: float = 1e-6
    softcap: float = 0.0                   # final logit soft-capping (Gemma 2); 0 = none

    @property
    def full_depth(self) -> bool:
        return self.exit_layer >= self.n_layers

    @property
    def vocab_size(self) -> int:
        return int(self.vocab_ids.size)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """(n, V) float32 draft logits over ``vocab_ids`` from (n, n_embd) hidden states."""
        h = np.asarray(hidden, np.float32)
        # einsum, not matmul: a few rows against V rows is a GEMV, which a multi-threaded BLAS slows down on a
        # busy CPU shared with llama.cpp's threads (measured 3-4 ms with einsum vs 5-11 ms, V = 16384)
        if not self.full_depth:
            h = rms_norm(np.einsum("nd,de->ne", h, self.w) + self.b, self.norm_weight, self.norm_eps)
        out = np.einsum("nd,vd->nv", h, self.rows)
        return self.softcap * np.tanh(out / self.softcap) if self.softcap else out

    def logits_from_residual(self, residual: np.ndarray) -> np.ndarray:
        """``logits`` from the residual stream before any final norm (what an ONNX graph cut at E gives):
        at full depth the final norm is applied first; below it, ``logits`` already ends with it."""
        if self.full_depth:
            return self.logits(rms_norm(residual, self.norm_weight, self.norm_eps))
        return self.logits(residual)

    def full_row(self, logits: np.ndarray, n_vocab: int) -> np.ndarray:
        """The head's (V,) logits as a (1, n_vocab) float32 row of the whole vocabulary, -inf outside its V
        tokens (what an exit returns in place of the model's logits)."""
        out = np.full((1, n_vocab), -np.inf, np.float32)
        out[0, self.vocab_ids] = logits
        return out

    def predict(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(token ids (n,), top-1 minus top-2 probability (n,)) of the head's softmax over its V tokens."""
        logits = self.logits(hidden)
        return self.vocab_ids[np.argmax(logits, axis=-1)], probability_margin(logits)


def probability_margin(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 softmax probability per row of (n, V) logits."""
    top2 = np.partition(logits, -2, axis=-1)[:, -2:]          # (n, 2): second best, best
    z = np.log(np.exp(logits - top2[:, 1:]).sum(axis=-1))      # log-sum-exp relative to the best
    return np.exp(-z) - np.exp(top2[:, 0] - top2[:, 1] - z)


def save_head(path: str | os.PathLike, head: ExitHead) -> Path:
    """Write ``head`` as ``.npz`` atomically (temporary name, then rename). Returns the path."""
    path = Path(path)
    arrays = {"format": np.array(HEAD_FORMAT), "exit_layer": np.array(head.exit_layer),
              "n_layers": np.array(head.n_layers), "vocab_ids": head.vocab_ids, "rows": head.rows,
              "norm_eps": np.array(head.norm_eps), "softcap": np.array(head.softcap)}
    for name in ("w", "b", "norm_weight"):
        if getattr(head, name) is not None:
            arrays[name] = getattr(head, name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez(out, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_head(path: str | os.PathLike) -> ExitHead:
    """Read a head written by ``save_head``. Raises ValueError for another format, OSError when unreadable."""
    with np.load(path, allow_pickle=False) as data:
        if int(data["format"]) != HEAD_FORMAT:
            raise ValueError(f"{path}: exit head format {int(data['format'])}, this edgellm reads {HEAD_FORMAT}")
        optional = {name: data[name] for name in ("w", "b", "norm_weight") if name in data}
        return ExitHead(exit_layer=int(data["exit_layer"]), n_layers=int(data["n_layers"]),
                        vocab_ids=data["vocab_ids"].astype(np.int64), rows=data["rows"].astype(np.float32),
                        norm_eps=float(data["norm_eps"]), softcap=float(data["softcap"]), **optional)


# --- reading the model's own tensors from its GGUF ---

@dataclass(frozen=True)
class OutputWeights:
    """What a head needs from the model file."""

    rows: np.ndarray          # (V, n_embd) float32: output rows of the chosen ids, dequantized
    norm_weight: np.ndarray   # (n_embd,) float32
    norm_eps: float
    softcap: float
    n_layers: int


def read_output_weights(gguf_path: str | os.PathLike, ids: np.ndarray) -> OutputWeights:
    """Dequantize the output-matrix rows ``ids`` (and read the final norm) from a GGUF file.

    Reads the header with the converters' fast parser (gguf-py's reader spends seconds on a 262k-token
    vocabulary) and only the wanted rows of the memory-mapped data.

    Raises:
        ValueError: the file has no output or embedding matrix, final norm, or architecture keys.
        QuantizeError: the file is not a readable GGUF file.
    """
    import mmap

    import gguf
    from gguf.quants import dequantize

    from edgellm.converters.quantize import read_gguf_header

    header = read_gguf_header(gguf_path)
    tensors = {t.name: t for t in header.tensors}
    name = next((n for n in OUTPUT_TENSORS if n in tensors), None)
    if name is None or NORM_TENSOR not in tensors:
        raise ValueError(f"{gguf_path} has no {' or '.join(OUTPUT_TENSORS)} / {NORM_TENSOR}")
    meta = header.metadata
    arch = meta.get("general.architecture")
    if f"{arch}.block_count" not in meta:
        raise ValueError(f"{gguf_path} has no {arch}.block_count")
    with open(gguf_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        rows = _rows(buf, header.data_start, tensors[name], np.asarray(ids, np.int64), gguf, dequantize)
        norm = _rows(buf, header.data_start, tensors[NORM_TENSOR], np.array([0]), gguf, dequantize)[0]
    return OutputWeights(rows=rows, norm_weight=norm,
                         norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
                         softcap=float(meta.get(f"{arch}.final_logit_softcapping", 0.0)),
                         n_layers=int(meta[f"{arch}.block_count"]))


def _rows(buf, data_start: int, info, ids: np.ndarray, gguf, dequantize) -> np.ndarray:
    """(len(ids), ne[0]) float32: rows ``ids`` of a tensor, dequantized."""
    qtype = gguf.GGMLQuantizationType[info.type]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    row_bytes = info.ne[0] // block * type_size
    n_rows = int(np.prod(info.ne[1:])) if len(info.ne) > 1 else 1
    start = data_start + info.offset
    data = np.frombuffer(buf, np.uint8, n_rows * row_bytes, start).reshape(n_rows, row_bytes)
    picked = np.ascontiguousarray(data[ids])                   # copies only the wanted rows
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
        return picked.view(dtype).astype(np.float32).reshape(len(ids), info.ne[0])
    return dequantize(picked, qtype).astype(np.float32).reshape(len(ids), info.ne[0])


def reduced_head(gguf_path: str | os.PathLike, ranked: np.ndarray, vocab_size: int, *, exit_layer: int | None = None,
                 affine: tuple[np.ndarray, np.ndarray] | None = None, weights: OutputWeights | None = None) -> ExitHead:
    """An ExitHead over the first ``vocab_size`` ids of ``ranked`` (full depth unless ``exit_layer``/``affine``).
    ``weights``: rows of at least the first ``vocab_size`` ranked ids, already read (else read now)."""
    ids = np.asarray(ranked[:vocab_size], np.int64)
    out = weights or read_output_weights(gguf_path, ids)
    out = dataclasses.replace(out, rows=out.rows[:vocab_size])
    exit_layer = out.n_layers if exit_layer is None else exit_layer
    w, b = affine if affine is not None else (None, None)
    if exit_layer < out.n_layers and w is None:
        raise ValueError(f"an exit after layer {exit_layer} of {out.n_layers} needs a fitted affine map")
    return ExitHead(exit_layer=exit_layer, n_layers=out.n_layers, vocab_ids=ids, rows=out.rows, w=w, b=b,
                    norm_weight=out.norm_weight, norm_eps=out.norm_eps, softcap=out.softcap)
