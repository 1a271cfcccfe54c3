"""The decoder graph with KV cache, in ONNX Runtime GenAI's and Optimum's I/O layout.

Inputs: ``input_ids`` (batch, seq) int64, ``attention_mask`` (batch, total) int64, ``position_ids``
(batch, seq) int64 unless RoPE is fused into GroupQueryAttention, ``past_key_values.{i}.key/value``
(batch, kv_heads, past, head_dim); outputs ``logits`` (batch, seq, vocab) and ``present.{i}.key/value``.
One extra input, ``logits_to_keep`` (int64 scalar, default 0 = every position), limits the output head
to the last k positions as Hugging Face's argument of that name does; runtimes that do not know it
(ORT GenAI) leave the default.

Per layer (Gemma's sandwich norms where the checkpoint has them)::

    h, residual = SkipRMSNorm(prev, residual)        (the first layer: RMSNorm of the embeddings)
    attn = o_proj(Attention(qkv_proj(h)))             [attn = RMSNorm(attn) with attn_post_norm]
    h, residual = SkipRMSNorm(attn, residual)
    prev = down_proj(act(gate) * up)                  [prev = RMSNorm(prev) with ffn_post_norm]
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
from onnx import TensorProto

from edgellm.converters.onnx import attention
from edgellm.converters.onnx.attention import Layer, Shared
from edgellm.converters.onnx.graph import GraphBuilder
from edgellm.converters.onnx.layers import (ACTIVATIONS, QuantWeight, cast_weights, gather_block_quantized,
                                             linear, matmul_nbits, norm_weight, quantize_weight, rms_norm,
                                             skip_rms_norm, weight_name)
from edgellm.converters.onnx.options import Choices
from edgellm.converters.onnx.weights import FUSED_UP, Weights, rows_per_chunk
from edgellm.converters.spec import ModelSpec
from edgellm.errors import ConvertTypeError

INPUT_IDS, ATTENTION_MASK, POSITION_IDS = "input_ids", "attention_mask", "position_ids"
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
LOGITS, LOGITS_TO_KEEP = "logits", "logits_to_keep"
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"


def build(g: GraphBuilder, w: Weights, spec: ModelSpec, hp: Mapping[str, Any], ch: Choices,
          on_layer: Callable[[int], None] | None = None) -> None:
    """Add the whole decoder to ``g`` (weights stream to its external data file as they are added).
    ``on_layer(n)`` is called once the embeddings (n = 0) and each layer (n = index + 1) are written."""
    if spec.activation not in ACTIVATIONS:
        raise ConvertTypeError(type="onnx", problem=f"activation {spec.activation!r} is not implemented",
                               hint_text=f"known: {', '.join(ACTIVATIONS)}")
    shared = _interface(g, spec, ch)
    x, tied_head = _embeddings(g, w, spec, ch)
    report = on_layer or (lambda n: None)
    report(0)
    residual, out = x, None
    for i in range(spec.n_layers):
        out, residual = _layer(g, w, spec, hp, ch, shared, i, out, residual)
        report(i + 1)
    _head(g, w, spec, ch, out, residual, tied_head)


def _interface(g: GraphBuilder, spec: ModelSpec, ch: Choices) -> Shared:
    """Graph inputs and outputs in ORT GenAI's order, and the attention values every layer shares."""
    g.input(INPUT_IDS, TensorProto.INT64, [BATCH, SEQ])
    mask = g.input(ATTENTION_MASK, TensorProto.INT64, [BATCH, TOTAL])
    positions = None if ch.provider.fused_rope else g.input(POSITION_IDS, TensorProto.INT64, [BATCH, SEQ])
    kv_shape = [BATCH, spec.n_kv_head, PAST, spec.head_dim]
    for i in range(spec.n_layers):
        g.input(PAST_KEY % i, ch.onnx_io, kv_shape)
        g.input(PAST_VALUE % i, ch.onnx_io, kv_shape)
    g.optional_input(LOGITS_TO_KEEP, np.array(0, np.int64))
    g.output(LOGITS, ch.onnx_io, [BATCH, "logits_length", spec.vocab_size])
    present_shape = [BATCH, spec.n_kv_head, TOTAL, spec.head_dim]
    for i in range(spec.n_layers):
        g.output(PRESENT_KEY % i, ch.onnx_io, present_shape)
        g.output(PRESENT_VALUE % i, ch.onnx_io, present_shape)
    shared = Shared(mask=mask, position_ids=positions)
    if ch.provider.gqa:
        attention.lengths(g, shared)
    return shared


def _embeddings(g: GraphBuilder, w: Weights, spec: ModelSpec, ch: Choices) -> tuple[str, QuantWeight | None]:
    """Token rows of the table, times sqrt(hidden) for Gemma; with ``share_embeddings`` and a tied model, also
    the quantized weight the output projection reuses (less disk; but the shared codes stay mapped next to
    MatMulNBits' prepacked copy, so resident memory grows by the table's size)."""
    path = "/model/embed_tokens"
    tied = None
    if ch.embed_bits:
        table = quantize_weight(g, w, ch, path, [("embed", None)], ch.embed_bits, ch.table_block_size)
        x = gather_block_quantized(g, ch, path, INPUT_IDS, table)
        shares = ch.share_embeddings and not w.has("lm_head") and ch.embed_bits == ch.lm_head_bits
        tied = table if shares else None
    else:
        x = g.op("Gather", [_table(g, w, ch, path), INPUT_IDS], f"{path}/Gather", axis=0)
    if spec.embedding_scale != 1.0:
        x = g.op("Mul", [x, g.constant(spec.embedding_scale, ch.np_io)], f"{path}/Mul")
    return x, tied


def _table(g: GraphBuilder, w: Weights, ch: Choices, path: str) -> str:
    """The embedding table (vocab, hidden) in the I/O dtype, streamed in row chunks."""
    n, k = w.shape("embed")
    step = rows_per_chunk(k)
    chunks = (cast_weights(w.rows("embed", None, r, min(r + step, n)), ch.np_io, path) for r in range(0, n, step))
    name = g.weight_chunks(weight_name(path, "weight"), [n, k], ch.onnx_io, chunks, n * k * ch.np_io.itemsize)
    w.release("embed")
    return name


def _layer(g: GraphBuilder, w: Weights, spec: ModelSpec, hp: Mapping[str, Any], ch: Choices, shared: Shared,
           i: int, prev: str | None, residual: str) -> tuple[str, str]:
    base = f"/model/layers.{i}"
    eps = spec.norm_eps
    norm = norm_weight(g, w, ch, f"{base}/input_layernorm", "attn_norm", i)
    if prev is None:
        h = rms_norm(g, ch, f"{base}/input_layernorm", residual, norm, eps)
    else:
        h, residual = skip_rms_norm(g, ch, f"{base}/input_layernorm", prev, residual, norm, eps)
    out = _attention(g, w, spec, hp, ch, shared, i, h)
    if w.has("attn_post_norm", i):
        out = rms_norm(g, ch, f"{base}/post_attention_layernorm", out,
                       norm_weight(g, w, ch, f"{base}/post_attention_layernorm", "attn_post_norm", i), eps)
    norm = norm_weight(g, w, ch, f"{base}/pre_feedforward_layernorm", "ffn_norm", i)
    h, residual = skip_rms_norm(g, ch, f"{base}/pre_feedforward_layernorm", out, residual, norm, eps)
    out = _mlp(g, w, spec, ch, i, h)
    if w.has("ffn_post_norm", i):
        out = rms_norm(g, ch, f"{base}/post_feedforward_layernorm", out,
                       norm_weight(g, w, ch, f"{base}/post_feedforward_layernorm", "ffn_post_norm", i), eps)
    return out, residual


def _attention(g: GraphBuilder, w: Weights, spec: ModelSpec, hp: Mapping[str, Any], ch: Choices, shared: Shared,
               i: int, h: str) -> str:
    path = f"/model/layers.{i}/attn"
    bits = ch.precision.bits
    parts = [("qkv", i)] if w.has("qkv", i) else [("q", i), ("k", i), ("v", i)]
    bias = [(f"{r}_bias", i) for r in ("q", "k", "v") if w.has(f"{r}_bias", i)]
    qkv = linear(g, w, ch, f"{path}/qkv_proj", h, parts, bits, bias)
    sliding = spec.swa_layers[i] and spec.sliding_window is not None
    layer = Layer(i, spec.sliding_window if sliding else None, attention.inv_freq(spec, hp, sliding),
                  norm_weight(g, w, ch, f"{path}/q_norm", "q_norm", i) if w.has("q_norm", i) else None,
                  norm_weight(g, w, ch, f"{path}/k_norm", "k_norm", i) if w.has("k_norm", i) else None)
    past, present = (PAST_KEY % i, PAST_VALUE % i), (PRESENT_KEY % i, PRESENT_VALUE % i)
    softcap = hp.get("attn_logit_softcapping")
    build_attention = attention.gqa if ch.provider.gqa else attention.standard
    out = build_attention(g, ch, spec, shared, layer, qkv, past, present, softcap)
    o_bias = [("o_bias", i)] if w.has("o_bias", i) else []
    return linear(g, w, ch, f"{path}/o_proj", out, [("o", i)], bits, o_bias)


def _mlp(g: GraphBuilder, w: Weights, spec: ModelSpec, ch: Choices, i: int, h: str) -> str:
    path = f"/model/layers.{i}/mlp"
    parts = [(FUSED_UP, i)] if w.has(FUSED_UP, i) else [("gate", i), ("up", i)]
    gate_up = linear(g, w, ch, f"{path}/gate_up_proj", h, parts, ch.precision.bits)
    gate, up = g.node("Split", [gate_up, g.constant([spec.n_ff, spec.n_ff], np.int64)], f"{path}/Split",
                      n_out=2, axis=-1)
    act = ACTIVATIONS[spec.activation](g, ch, f"{path}/act_fn", gate)
    product = g.op("Mul", [act, up], f"{path}/Mul")
    return linear(g, w, ch, f"{path}/down_proj", product, [("down", i)], ch.precision.bits)


def _head(g: GraphBuilder, w: Weights, spec: ModelSpec, ch: Choices, out: str, residual: str,
          tied: QuantWeight | None) -> None:
    """Final norm, the last ``logits_to_keep`` positions, output projection, optional soft-capping."""
    norm = norm_weight(g, w, ch, "/model/norm", "final_norm", None)
    h, _ = skip_rms_norm(g, ch, "/model/norm", out, residual, norm, spec.norm_eps)
    h = _keep_last(g, h)
    if tied is not None:                                      # the quantized table's codes, shared
        logits = matmul_nbits(g, ch, "/lm_head", h, tied)
    else:                                                     # tied float models store the table transposed
        role = "lm_head" if w.has("lm_head") else "embed"
        logits = linear(g, w, ch, "/lm_head", h, [(role, None)], ch.lm_head_bits, block=ch.table_block_size)
    if spec.final_logit_softcap:
        cap = g.constant(spec.final_logit_softcap, ch.np_io)
        logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, cap], "/lm_head/softcap/Div")],
                                   "/lm_head/softcap/Tanh"), cap], "/lm_head/softcap/Mul")
    g.node("Identity", [logits], "/model/output/logits", outputs=[LOGITS])


def _keep_last(g: GraphBuilder, h: str) -> str:
    """h[:, -k:] for k = logits_to_keep > 0, all of h for 0."""
    path = "/model/logits_to_keep"
    keep = g.op("Reshape", [LOGITS_TO_KEEP, g.constant([1], np.int64)], f"{path}/Reshape")
    zero = g.constant([0], np.int64)
    start = g.op("Where", [g.op("Greater", [keep, zero], f"{path}/Greater"),
                           g.op("Neg", [keep], f"{path}/Neg"), zero], f"{path}/Where")
    return g.op("Slice", [h, start, g.constant([attention.INT64_MAX], np.int64), g.constant([1], np.int64)],
                f"{path}/Slice")
