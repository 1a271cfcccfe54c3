"""Block quantization of weight matrices into ONNX Runtime's ``MatMulNBits`` layout, in numpy.

Layout (ContribOperators.md, com.microsoft.MatMulNBits): for a weight W of N output rows and K inputs
(Hugging Face's (out_features, in_features) order, no transpose needed) each row is cut into
``k_blocks = ceil(K / block)`` blocks along K (the last one zero-padded);

* ``B``: uint8 (N, k_blocks, block * bits / 8), values packed along K, for 4 bits the first value in the
  low nibble and the second in the high nibble;
* ``scales``: (N, k_blocks) in the activation dtype;
* ``zero_points``: uint8 (N, ceil(k_blocks * bits / 8)), packed like B; absent for symmetric blocks,
  which then use the default zero point 2^(bits-1).

Dequantization is ``w = (q - zero_point) * scale``. Symmetric blocks follow llama.cpp's Q4_0 (and ORT's
``quant_slice_symmetric``): the scale is the block's signed extreme divided by -2^(bits-1), so the extreme
maps exactly to the most negative code. Asymmetric blocks span [min(w, 0), max(w, 0)].
The same codes also serve ``DequantizeLinear`` with ``block_size`` (opset 21, standard-op graphs) through
``to_dequantize_linear``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Quantized:
    """Rows of a weight matrix in MatMulNBits layout."""

    packed: np.ndarray               # uint8 (n_rows, k_blocks, block * bits // 8)
    scales: np.ndarray               # float32 (n_rows, k_blocks)
    zero_points: np.ndarray | None   # uint8 (n_rows, ceil(k_blocks * bits / 8)), None when symmetric


def n_blocks(k: int, block: int) -> int:
    return -(-k // block)


# quantization method -> how symmetric blocks pick their scale (asymmetric blocks always span [min, max])
METHODS = ("rtn", "mse")
SEARCH_STEPS = np.arange(-1.0, 1.01, 0.25)      # code-range offsets tried by "mse" (9 candidates)


def quantize(w: np.ndarray, bits: int, block: int, symmetric: bool, method: str = "rtn") -> Quantized:
    """Quantize ``w`` (n_rows, K) float32 row by row in blocks of ``block`` along K.

    ``method`` for symmetric blocks: "rtn" maps the block's extreme to the most negative code (Q4_0 exactly);
    "mse" also tries the extreme at a few neighbouring code values, refits each candidate's scale by least
    squares and keeps the one with the smallest squared error (the idea of llama.cpp's make_qx_quants;
    about 10% lower weight error than "rtn" on Gemma 3 at 4 bits).
    """
    rows, k = w.shape
    kb = n_blocks(k, block)
    blocks = np.zeros((rows, kb * block), np.float32)
    blocks[:, :k] = w
    blocks = blocks.reshape(rows, kb, block)
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r} ({', '.join(METHODS)})")
    pick = _asymmetric if not symmetric else (_symmetric_search if method == "mse" else _symmetric)
    codes, scales, zero = pick(blocks, bits)
    packed = pack(codes, bits)
    zero_points = None if symmetric else pack(zero, bits)
    return Quantized(packed, scales, zero_points)


def _symmetric(blocks: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, None]:
    half = 1 << (bits - 1)                                      # 8 for 4 bits, 128 for 8 bits
    index = np.abs(blocks).argmax(axis=-1)[..., None]
    extreme = np.take_along_axis(blocks, index, axis=-1)[..., 0]    # signed value of largest magnitude
    scales = extreme / np.float32(-half)
    inverse = np.divide(1.0, scales, out=np.zeros_like(scales), where=scales != 0)
    # Q4_0's rounding: truncation of x / d + zero + 0.5 (x / d >= -zero, so this rounds half up)
    codes = np.floor(blocks * inverse[..., None] + np.float32(half + 0.5))
    return np.clip(codes, 0, 2 * half - 1).astype(np.uint8), scales.astype(np.float32), None


def _symmetric_search(blocks: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, None]:
    half = 1 << (bits - 1)
    index = np.abs(blocks).argmax(axis=-1)[..., None]
    extreme = np.take_along_axis(blocks, index, axis=-1)                 # (rows, kb, 1), signed
    best_err = np.full(blocks.shape[:-1], np.inf, np.float32)
    best_scale = np.zeros(blocks.shape[:-1], np.float32)
    best_codes = np.zeros(blocks.shape, np.float32)
    for step in SEARCH_STEPS:
        inverse = np.divide(np.float32(-(half + step)), extreme, out=np.zeros_like(extreme), where=extreme != 0)
        codes = np.clip(np.floor(blocks * inverse + np.float32(0.5)), -half, half - 1)   # signed codes
        norm = (codes * codes).sum(axis=-1)
        scale = np.divide((blocks * codes).sum(axis=-1), norm, out=np.zeros_like(norm), where=norm > 0)
        err = ((blocks - scale[..., None] * codes) ** 2).sum(axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_codes = np.where(better[..., None], codes, best_codes)
    return (best_codes + half).astype(np.uint8), best_scale.astype(np.float32), None


def _asymmetric(blocks: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    top = (1 << bits) - 1
    low = np.minimum(blocks.min(axis=-1), 0.0)
    high = np.maximum(blocks.max(axis=-1), 0.0)
    scales = ((high - low) / np.float32(top)).astype(np.float32)
    inverse = np.divide(1.0, scales, out=np.zeros_like(scales), where=scales != 0)
    zero = np.clip(np.rint(-low * inverse), 0, top)
    codes = np.clip(np.rint(blocks * inverse[..., None]) + zero[..., None], 0, top)
    return codes.astype(np.uint8), scales, zero.astype(np.uint8)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes (..., n) -> bytes (..., ceil(n * bits / 8)); 4 bits: even index in the low nibble."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    if bits != 4:
        raise ValueError(f"{bits}-bit packing is not implemented (4 or 8)")
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The inverse of ``pack``: (..., bytes) -> uint8 codes (..., n)."""
    if bits == 8:
        return packed[..., :n]
    both = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return both[..., :n]


def dequantize(q: Quantized, bits: int, block: int, k: int) -> np.ndarray:
    """float32 (n_rows, K): what MatMulNBits multiplies by (for tests and error measurements)."""
    rows, kb, _ = q.packed.shape
    codes = unpack(q.packed, bits, block).astype(np.float32)            # (rows, kb, block)
    if q.zero_points is None:
        zero = np.full((rows, kb), 1 << (bits - 1), np.float32)
    else:
        zero = unpack(q.zero_points, bits, kb).astype(np.float32)
    w = (codes - zero[..., None]) * q.scales[..., None].astype(np.float32)
    return w.reshape(rows, kb * block)[:, :k]


def to_dequantize_linear(q: Quantized, bits: int, block: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, scales, zero points) for opset-21 ``DequantizeLinear(axis=0, block_size)`` of W^T (K, N).

    Codes are uint4/uint8 values, unpacked here (the ONNX writer packs uint4); the last block along K may be
    partial, as blocked DequantizeLinear allows. Shapes: codes (K, N), scales (kb, N), zero points (kb, N).
    """
    rows, kb, _ = q.packed.shape
    codes = unpack(q.packed, bits, block).reshape(rows, kb * block)
    if q.zero_points is None:
        zero = np.full((rows, kb), 1 << (bits - 1), np.uint8)
    else:
        zero = unpack(q.zero_points, bits, kb)
    return codes[:, :k].T.copy(), q.scales.T.copy(), zero.T.copy()
