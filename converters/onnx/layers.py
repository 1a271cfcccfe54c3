"""Building blocks of the decoder graph: linear layers in three weight formats, RMSNorms, activations.

A linear layer's weight may be several checkpoint tensors stacked along the output rows (Q|K|V packed
into one MatMul, gate|up into another), written in one of three formats:

* float ``MatMul``: W^T (K, N) in the I/O dtype, produced column-block by column-block;
* ``MatMulNBits`` (com.microsoft): block-quantized rows (``quant``), produced row-chunk by row-chunk;
* ``DequantizeLinear(block_size) -> MatMul`` (standard opset-21 ops) for providers without contrib ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from onnx import TensorProto

from edgellm.converters.onnx import quant
from edgellm.converters.onnx.graph import ELEMENT_TYPES, MS_DOMAIN, GraphBuilder
from edgellm.converters.onnx.options import Choices
from edgellm.converters.onnx.weights import Key, Weights, rows_per_chunk
from edgellm.errors import ConvertTypeError

F16_MAX = float(np.finfo(np.float16).max)
QUANT_CHUNK_ELEMENTS = 1 << 22      # weights quantized at a time: the scale search holds a few float32 copies


def weight_name(node_path: str, suffix: str) -> str:
    """Initializer name of a node path: "/model/layers.0/attn/qkv_proj" -> "model.layers.0.attn.qkv_proj.weight"."""
    return node_path.strip("/").replace("/", ".") + "." + suffix


def cast_weights(values: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """``values`` in ``dtype``; refuses float16 overflow instead of writing infinities."""
    if dtype == np.float16 and values.size and float(np.abs(values).max()) > F16_MAX:
        raise ConvertTypeError(type="fp16", problem=f"{what} has values beyond the float16 range +-{F16_MAX:g}",
                               hint_text="convert with --type fp32, int8 or int4")
    return values.astype(dtype, copy=False)


def _dims(w: Weights, parts: Sequence[Key]) -> tuple[list[int], int]:
    rows = [w.shape(role, layer)[0] for role, layer in parts]
    return rows, w.shape(*parts[0])[1]


def linear(g: GraphBuilder, w: Weights, ch: Choices, path: str, x: str, parts: Sequence[Key],
           bits: int | None, bias: Sequence[Key] = (), block: int | None = None) -> str:
    """``x @ W^T (+ b)`` where W stacks the ``parts`` tensors; ``bits`` None writes float weights; ``block``
    overrides the model's block size."""
    if bits is None:
        y = _float_matmul(g, w, ch, path, x, parts)
    elif ch.provider.matmul_nbits:
        y = matmul_nbits(g, ch, path, x, quantize_weight(g, w, ch, path, parts, bits, block))
    else:
        y = _dequantize_matmul(g, w, ch, path, x, parts, bits, block)
    for role, layer in parts:
        w.release(role, layer)
    if bias:
        values = np.concatenate([w.full(role, layer) for role, layer in bias])
        b = g.weight(weight_name(path, "bias"), cast_weights(values, ch.np_io, f"{path} bias"))
        y = g.op("Add", [y, b], f"{path}/Add")
    return y


def _float_matmul(g: GraphBuilder, w: Weights, ch: Choices, path: str, x: str, parts: Sequence[Key]) -> str:
    rows, k = _dims(w, parts)
    n, dtype = sum(rows), ch.float_weights
    step = rows_per_chunk(n)

    def chunks():
        for k0 in range(0, k, step):                 # W^T rows k0..k1 = columns k0..k1 of every part
            cols = slice(k0, min(k0 + step, k))
            block = np.concatenate([w.rows(r, l, 0, rows[i], cols).T for i, (r, l) in enumerate(parts)], axis=1)
            yield cast_weights(block, dtype, path)

    weight = g.weight_chunks(weight_name(path, "weight"), [k, n], ELEMENT_TYPES[dtype], chunks(),
                             k * n * dtype.itemsize)
    return g.op("MatMul", [x, weight], f"{path}/MatMul")


def _quantized_rows(w: Weights, ch: Choices, parts: Sequence[Key], bits: int, block: int,
                    sink: Callable[[int, quant.Quantized], None]):
    """Yield the packed B of each row chunk of the stacked parts; ``sink(first_row, q)`` gets every chunk."""
    rows, k = _dims(w, parts)
    step, first = rows_per_chunk(k, QUANT_CHUNK_ELEMENTS), 0
    for (role, layer), n_rows in zip(parts, rows):
        for r0 in range(0, n_rows, step):
            q = quant.quantize(w.rows(role, layer, r0, min(r0 + step, n_rows)), bits, block, ch.symmetric,
                               ch.quant_method)
            sink(first + r0, q)
            yield q.packed
        first += n_rows


@dataclass(frozen=True)
class QuantWeight:
    """A block-quantized weight already written: the packed codes' initializer, its scales still in memory."""

    packed: str                      # initializer name, uint8 (n, k_blocks, block * bits / 8)
    scales: np.ndarray               # float32 (n, k_blocks)
    zero_points: np.ndarray | None   # uint8 (n, ceil(k_blocks * bits / 8)), None when symmetric
    n: int
    k: int
    bits: int
    block: int


def quantize_weight(g: GraphBuilder, w: Weights, ch: Choices, path: str, parts: Sequence[Key],
                    bits: int, block: int | None = None) -> QuantWeight:
    """Quantize the stacked ``parts`` row chunk by row chunk (blocks of ``block``, default the model's),
    streaming the packed codes to the data file."""
    rows, k = _dims(w, parts)
    n, block = sum(rows), block or ch.block_size
    kb, blob = quant.n_blocks(k, block), block * bits // 8
    scales = np.empty((n, kb), np.float32)
    zeros = None if ch.symmetric else np.empty((n, -(-kb * bits // 8)), np.uint8)

    def sink(first: int, q: quant.Quantized) -> None:
        scales[first:first + len(q.scales)] = q.scales
        if zeros is not None:
            zeros[first:first + len(q.zero_points)] = q.zero_points

    packed = g.weight_chunks(weight_name(path, f"weight_Q{bits}G{block}"), [n, kb, blob], TensorProto.UINT8,
                             _quantized_rows(w, ch, parts, bits, block, sink), n * kb * blob)
    for role, layer in parts:
        w.release(role, layer)
    return QuantWeight(packed, scales, zeros, n, k, bits, block)


def matmul_nbits(g: GraphBuilder, ch: Choices, path: str, x: str, qw: QuantWeight) -> str:
    """``x @ W^T`` with com.microsoft MatMulNBits (scales and zero points flat, as ORT's quantizer writes them)."""
    inputs = [x, qw.packed, g.weight(weight_name(path, "weight_scale"), qw.scales.astype(ch.np_io).reshape(-1))]
    if qw.zero_points is not None:
        inputs.append(g.weight(weight_name(path, "weight_zp"), qw.zero_points.reshape(-1)))
    return g.op("MatMulNBits", inputs, f"{path}/MatMulNBits", domain=MS_DOMAIN, K=qw.k, N=qw.n, bits=qw.bits,
                block_size=qw.block, accuracy_level=ch.accuracy_level)


def gather_block_quantized(g: GraphBuilder, ch: Choices, path: str, ids: str, qw: QuantWeight) -> str:
    """Rows ``ids`` of a quantized table with com.microsoft GatherBlockQuantized, reading the same packed
    codes as MatMulNBits ((n, k_blocks, blob) with quantize_axis 2): a tied output projection shares them.
    Returns (batch, seq, k)."""
    kb = qw.scales.shape[1]
    inputs = [qw.packed, ids, g.weight(weight_name(path, "weight_scale_3d"), qw.scales.astype(ch.np_io)[..., None])]
    if qw.zero_points is not None:        # one zero point per block: a byte each (low nibble for 4 bits)
        codes = quant.unpack(qw.zero_points, qw.bits, kb)[..., None]
        inputs.append(g.weight(weight_name(path, "weight_zp_3d"), np.ascontiguousarray(codes)))
    rows = g.op("GatherBlockQuantized", inputs, f"{path}/GatherBlockQuantized", domain=MS_DOMAIN, bits=qw.bits,
                block_size=qw.block, gather_axis=0, quantize_axis=2)          # (batch, seq, k_blocks, block)
    flat = g.op("Reshape", [rows, g.constant([0, 0, -1], np.int64)], f"{path}/Reshape")
    if kb * qw.block == qw.k:
        return flat
    return g.op("Slice", [flat, g.constant([0], np.int64), g.constant([qw.k], np.int64), g.constant([2], np.int64)],
                f"{path}/Slice")                                               # drop the last block's padding


def _dequantize_matmul(g: GraphBuilder, w: Weights, ch: Choices, path: str, x: str, parts: Sequence[Key],
                       bits: int, block: int | None) -> str:
    """Standard ops: opset-21 blocked DequantizeLinear of W^T (K, N) along K, then MatMul.
    Holds the layer's codes in memory (one byte a weight) to transpose them."""
    rows, k = _dims(w, parts)
    n, block = sum(rows), block or ch.block_size
    kb = quant.n_blocks(k, block)
    codes, scales, zeros = np.empty((k, n), np.uint8), np.empty((kb, n), np.float32), np.empty((kb, n), np.uint8)

    def sink(first: int, q: quant.Quantized) -> None:
        c, s, z = quant.to_dequantize_linear(q, bits, block, k)
        codes[:, first:first + c.shape[1]], scales[:, first:first + c.shape[1]] = c, s
        zeros[:, first:first + c.shape[1]] = z

    for _ in _quantized_rows(w, ch, parts, bits, block, sink):
        pass
    pack = (lambda a: quant.pack(a.reshape(-1), 4)) if bits == 4 else (lambda a: a)
    b = g.weight(weight_name(path, f"weight_Q{bits}"), pack(codes), uint4=bits == 4, logical_shape=codes.shape)
    z = g.weight(weight_name(path, "weight_zp"), pack(zeros), uint4=bits == 4, logical_shape=zeros.shape)
    s = g.weight(weight_name(path, "weight_scale"), scales.astype(ch.np_io))
    deq = g.op("DequantizeLinear", [b, s, z], f"{path}/DequantizeLinear", axis=0, block_size=block)
    return g.op("MatMul", [x, deq], f"{path}/MatMul")


# --- norms ---

def rms_norm(g: GraphBuilder, ch: Choices, path: str, x: str, weight: str, eps: float) -> str:
    """RMSNorm over the last axis: ``x / sqrt(mean(x^2) + eps) * weight`` (statistics in float32)."""
    if ch.provider.contrib_norms:
        return g.op("SimplifiedLayerNormalization", [x, weight], f"{path}/SimplifiedLayerNormalization",
                    axis=-1, epsilon=eps, stash_type=1)
    f32 = x if ch.io_dtype == "float32" else g.op("Cast", [x], f"{path}/CastF32", to=TensorProto.FLOAT)
    square = g.op("Mul", [f32, f32], f"{path}/Square")
    mean = g.op("ReduceMean", [square, g.constant([-1], np.int64)], f"{path}/ReduceMean", keepdims=1)
    var = g.op("Add", [mean, g.constant(eps, np.float32)], f"{path}/AddEps")
    inv = g.op("Reciprocal", [g.op("Sqrt", [var], f"{path}/Sqrt")], f"{path}/Reciprocal")
    normed = g.op("Mul", [f32, inv], f"{path}/Normalize")
    if ch.io_dtype != "float32":
        normed = g.op("Cast", [normed], f"{path}/CastBack", to=ch.onnx_io)
    return g.op("Mul", [normed, weight], f"{path}/Scale")


def skip_rms_norm(g: GraphBuilder, ch: Choices, path: str, x: str, residual: str, weight: str,
                  eps: float) -> tuple[str, str]:
    """(RMSNorm(x + residual), x + residual): one SkipSimplifiedLayerNormalization where supported."""
    if ch.provider.contrib_norms:
        out = g.node("SkipSimplifiedLayerNormalization", [x, residual, weight], f"{path}/SkipLayerNorm",
                     n_out=4, domain=MS_DOMAIN, epsilon=eps)
        return out[0], out[3]
    total = g.op("Add", [x, residual], f"{path}/ResidualAdd")
    return rms_norm(g, ch, path, total, weight, eps), total


def norm_weight(g: GraphBuilder, w: Weights, ch: Choices, path: str, role: str, layer: int | None) -> str:
    return g.weight(weight_name(path, "weight"), cast_weights(w.full(role, layer), ch.np_io, path))


# --- activations: HF hidden_act -> graph builder ---

def _silu(g: GraphBuilder, ch: Choices, path: str, x: str) -> str:
    return g.op("Mul", [x, g.op("Sigmoid", [x], f"{path}/Sigmoid")], f"{path}/Mul")


def _gelu_tanh(g: GraphBuilder, ch: Choices, path: str, x: str) -> str:
    if ch.provider.contrib_norms:          # providers that take contrib ops have FastGelu (tanh approximation)
        return g.op("FastGelu", [x], f"{path}/FastGelu", domain=MS_DOMAIN)
    return g.op("Gelu", [x], f"{path}/Gelu", approximate="tanh")


ACTIVATIONS: dict[str, Callable[[GraphBuilder, Choices, str, str], str]] = {
    "silu": _silu, "swish": _silu, "gelu_pytorch_tanh": _gelu_tanh, "gelu_new": _gelu_tanh,
}
