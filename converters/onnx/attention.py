"""Self-attention with a KV cache: ONNX Runtime's GroupQueryAttention, or standard ops for other providers.

Both read ``past_key_values.{i}.key/value`` (batch, kv_heads, past, head_dim) and write
``present.{i}.key/value`` (batch, kv_heads, past + new, head_dim) straight from the attention node, so
an IO-bound runtime can hand GroupQueryAttention one buffer for past and present (its
past_present_share_buffer mode) and nothing is copied per token.

* GQA (com.microsoft): lengths come from ``attention_mask`` (seqlens_k = sum - 1, total = its width);
  RoPE is fused (``do_rotary``) with cos/sin caches, so the graph needs no ``position_ids``; sliding
  windows use ``local_window_size``: ORT 1.32's CPU kernel attends to ``local_window_size`` keys, the
  query's own included, as HF's sliding layers do with ``sliding_window`` (checked against the numpy
  reference by tests/test_onnx_convert.py; older ORT releases attended to one key more).
* Standard ops: RoPE from ``position_ids``, Concat for the cache, MatMul/Softmax with an additive mask
  built once per window size from positions and ``attention_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from onnx import TensorProto

from edgellm.converters.archs.llama import llama3_rope_factors
from edgellm.converters.onnx.graph import MS_DOMAIN, GraphBuilder
from edgellm.converters.onnx.layers import rms_norm
from edgellm.converters.onnx.options import Choices
from edgellm.converters.spec import ModelSpec
from edgellm.errors import ConvertTypeError

INT64_MAX = np.iinfo(np.int64).max


# --- RoPE inverse frequencies (rope_type -> function); float64 (rope_dim / 2,) ---

def _plain(spec: ModelSpec, hp: Mapping[str, Any], inv: np.ndarray) -> np.ndarray:
    return inv


def _linear(spec: ModelSpec, hp: Mapping[str, Any], inv: np.ndarray) -> np.ndarray:
    return inv / float(spec.rope_scaling.factor)            # positions divided by the factor


def _llama3(spec: ModelSpec, hp: Mapping[str, Any], inv: np.ndarray) -> np.ndarray:
    return inv / llama3_rope_factors(hp, spec).astype(np.float64)   # the GGUF converter's rope_freqs divisors


ROPE_SCALING = {None: _plain, "default": _plain, "linear": _linear, "llama3": _llama3}


def inv_freq(spec: ModelSpec, hp: Mapping[str, Any], sliding: bool) -> np.ndarray:
    """Inverse frequencies of a layer: sliding layers with their own theta (Gemma 3) are never scaled."""
    local = sliding and spec.rope_theta_local is not None
    theta = spec.rope_theta_local if local else spec.rope_theta
    dim = spec.rope_dim
    inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    kind = None if local or spec.rope_scaling is None else spec.rope_scaling.type
    if kind not in ROPE_SCALING:
        raise ConvertTypeError(type="onnx", problem=f"rope scaling {kind!r} is not implemented by the ONNX "
                                                    f"converter (known: linear, llama3)",
                               hint_text="convert to GGUF instead, which supports it")
    return ROPE_SCALING[kind](spec, hp, inv)


# --- what every layer shares ---

@dataclass
class Shared:
    """Values computed once per graph and used by every layer's attention."""

    mask: str                                   # attention_mask input
    position_ids: str | None
    seqlens_k: str | None = None                # GQA: int32 (batch,) index of each sequence's last token
    total_length: str | None = None             # GQA: int32 scalar, attention_mask width
    rope: dict[bytes, tuple[str, str]] = field(default_factory=dict)   # inv_freq bytes -> (cos, sin) names
    rope_gathered: dict[str, tuple[str, str]] = field(default_factory=dict)   # cos name -> gathered (cos, sin)
    masks: dict[int | None, str] = field(default_factory=dict)         # window -> additive mask


def lengths(g: GraphBuilder, shared: Shared) -> None:
    """seqlens_k = sum(attention_mask) - 1 and total_sequence_length = mask width, int32 (ORT GenAI's recipe)."""
    path = "/model/attn_mask_reformat/attn_mask_subgraph"
    total = g.op("ReduceSum", [shared.mask, g.constant([1], np.int64)], f"{path}/ReduceSum", keepdims=0)
    last = g.op("Sub", [total, g.constant(1, np.int64)], f"{path}/Sub")
    shared.seqlens_k = g.op("Cast", [last], f"{path}/Sub/Cast", to=TensorProto.INT32)
    width = g.op("Gather", [g.op("Shape", [shared.mask], f"{path}/Shape"), g.constant(1, np.int64)],
                 f"{path}/Gather", axis=0)
    shared.total_length = g.op("Cast", [width], f"{path}/Gather/Cast", to=TensorProto.INT32)


def rope_cache(g: GraphBuilder, ch: Choices, shared: Shared, inv: np.ndarray) -> tuple[str, str]:
    """cos/sin caches (context_length, rope_dim / 2) in the I/O dtype, one pair per distinct frequency set."""
    key = inv.tobytes()
    if key not in shared.rope:
        angles = np.outer(np.arange(ch.context_length, dtype=np.float64), inv)
        suffix = "" if not shared.rope else f"_{len(shared.rope)}"
        shared.rope[key] = (g.weight(f"cos_cache{suffix}", np.cos(angles).astype(ch.np_io), model_weight=False),
                            g.weight(f"sin_cache{suffix}", np.sin(angles).astype(ch.np_io), model_weight=False))
    return shared.rope[key]


@dataclass(frozen=True)
class Layer:
    """One layer's attention settings."""

    index: int
    window: int | None               # sliding window in tokens (None: full attention)
    inv_freq: np.ndarray
    q_norm: str | None               # per-head RMSNorm weights (qwen3, gemma3)
    k_norm: str | None


def _heads(g: GraphBuilder, path: str, x: str, n_heads: int, head_dim: int) -> str:
    return g.op("Reshape", [x, g.constant([0, 0, n_heads, head_dim], np.int64)], path)


def _merge_heads(g: GraphBuilder, path: str, x: str, width: int) -> str:
    return g.op("Reshape", [x, g.constant([0, 0, width], np.int64)], path)


def _qk_norm(g: GraphBuilder, ch: Choices, spec: ModelSpec, path: str, x: str, n_heads: int, weight: str) -> str:
    """RMSNorm over each head of x (batch, seq, heads * head_dim)."""
    heads = _heads(g, f"{path}/Reshape", x, n_heads, spec.head_dim)
    return _merge_heads(g, f"{path}/Merge", rms_norm(g, ch, path, heads, weight, spec.norm_eps),
                        n_heads * spec.head_dim)


def split_qkv(g: GraphBuilder, spec: ModelSpec, path: str, qkv: str) -> list[str]:
    sizes = [spec.n_head * spec.head_dim, spec.n_kv_head * spec.head_dim, spec.n_kv_head * spec.head_dim]
    return g.node("Split", [qkv, g.constant(sizes, np.int64)], f"{path}/Split", n_out=3, axis=-1)


def gqa(g: GraphBuilder, ch: Choices, spec: ModelSpec, shared: Shared, layer: Layer, qkv: str,
        past: tuple[str, str], present: tuple[str, str], softcap: float | None) -> str:
    """GroupQueryAttention on the packed QKV projection (split first when Q/K need norms or RoPE nodes)."""
    path = f"/model/layers.{layer.index}/attn"
    cos, sin = rope_cache(g, ch, shared, layer.inv_freq)
    q, k, v = qkv, "", ""
    if layer.q_norm or not ch.provider.fused_rope:
        q, k, v = split_qkv(g, spec, path, qkv)
    if layer.q_norm:
        q = _qk_norm(g, ch, spec, f"{path}/q_norm", q, spec.n_head, layer.q_norm)
        k = _qk_norm(g, ch, spec, f"{path}/k_norm", k, spec.n_kv_head, layer.k_norm)
    if not ch.provider.fused_rope:
        q, k = (g.op("RotaryEmbedding", [x, shared.position_ids, cos, sin], f"{path}/{name}_rotary/RotaryEmbedding",
                     domain=MS_DOMAIN, interleaved=0, num_heads=n, rotary_embedding_dim=spec.rope_dim)
                for x, name, n in ((q, "q", spec.n_head), (k, "k", spec.n_kv_head)))
    fused = ch.provider.fused_rope
    inputs = [q, k, v, past[0], past[1], shared.seqlens_k, shared.total_length] + ([cos, sin] if fused else [])
    out = g.node("GroupQueryAttention", inputs, f"{path}/GroupQueryAttention", domain=MS_DOMAIN,
                 outputs=[f"{path}/GroupQueryAttention/output_0", *present],
                 num_heads=spec.n_head, kv_num_heads=spec.n_kv_head, scale=spec.attention_scale,
                 local_window_size=layer.window or -1, do_rotary=int(fused),
                 rotary_interleaved=0, softcap=softcap or None)
    return out[0]


# --- standard ops ---

def _gathered_rope(g: GraphBuilder, shared: Shared, cos: str, sin: str) -> tuple[str, str]:
    """cos/sin rows of each position, (batch, seq, 1, rope_dim / 2)."""
    if cos not in shared.rope_gathered:
        axes = g.constant([2], np.int64)
        shared.rope_gathered[cos] = tuple(
            g.op("Unsqueeze", [g.op("Gather", [cache, shared.position_ids], f"/model/rotary/{cache}/Gather", axis=0),
                               axes], f"/model/rotary/{cache}/Unsqueeze") for cache in (cos, sin))
    return shared.rope_gathered[cos]


def _slice(g: GraphBuilder, path: str, x: str, start: int, stop: int, axis: int) -> str:
    return g.op("Slice", [x, g.constant([start], np.int64), g.constant([stop], np.int64),
                          g.constant([axis], np.int64)], path)


def rope_standard(g: GraphBuilder, spec: ModelSpec, path: str, x: str, cos: str, sin: str) -> str:
    """Rotate-half RoPE on x (batch, seq, heads, head_dim); dims past rope_dim pass through."""
    rot, half = spec.rope_dim, spec.rope_dim // 2
    x1, x2 = _slice(g, f"{path}/x1", x, 0, half, 3), _slice(g, f"{path}/x2", x, half, rot, 3)
    first = g.op("Sub", [g.op("Mul", [x1, cos], f"{path}/x1cos"), g.op("Mul", [x2, sin], f"{path}/x2sin")],
                 f"{path}/first")
    second = g.op("Add", [g.op("Mul", [x2, cos], f"{path}/x2cos"), g.op("Mul", [x1, sin], f"{path}/x1sin")],
                  f"{path}/second")
    parts = [first, second]
    if rot < spec.head_dim:
        parts.append(_slice(g, f"{path}/pass", x, rot, spec.head_dim, 3))
    return g.op("Concat", parts, f"{path}/Concat", axis=3)


def additive_mask(g: GraphBuilder, ch: Choices, shared: Shared, window: int | None) -> str:
    """(batch, 1, seq, total) mask: 0 where query position q sees key k (k <= q, not padding, and
    q - k < window when sliding), the dtype's lowest value elsewhere."""
    if window in shared.masks:
        return shared.masks[window]
    path = f"/model/attn_mask/window_{window or 'full'}"
    total = g.op("Gather", [g.op("Shape", [shared.mask], f"{path}/Shape"), g.constant(1, np.int64)],
                 f"{path}/Total", axis=0)
    keys = g.op("Range", [g.constant(0, np.int64), total, g.constant(1, np.int64)], f"{path}/Range")
    queries = g.op("Unsqueeze", [shared.position_ids, g.constant([2], np.int64)], f"{path}/Queries")  # (b, s, 1)
    allowed = g.op("LessOrEqual", [keys, queries], f"{path}/Causal")
    present = g.op("Equal", [shared.mask, g.constant(1, np.int64)], f"{path}/NotPadding")
    allowed = g.op("And", [allowed, g.op("Unsqueeze", [present, g.constant([1], np.int64)], f"{path}/Pad")],
                   f"{path}/And")
    if window:
        distance = g.op("Sub", [queries, keys], f"{path}/Distance")
        near = g.op("Less", [distance, g.constant(window, np.int64)], f"{path}/InWindow")
        allowed = g.op("And", [allowed, near], f"{path}/AndWindow")
    lowest = g.constant(np.finfo(ch.np_io).min, ch.np_io)
    mask = g.op("Where", [allowed, g.constant(0, ch.np_io), lowest], f"{path}/Where")
    shared.masks[window] = g.op("Unsqueeze", [mask, g.constant([1], np.int64)], f"{path}/Unsqueeze")
    return shared.masks[window]


def standard(g: GraphBuilder, ch: Choices, spec: ModelSpec, shared: Shared, layer: Layer, qkv: str,
             past: tuple[str, str], present: tuple[str, str], softcap: float | None) -> str:
    """Attention from MatMul/Softmax/Concat; grouped KV heads are repeated with Expand."""
    path = f"/model/layers.{layer.index}/attn"
    q, k, v = split_qkv(g, spec, path, qkv)
    cos, sin = _gathered_rope(g, shared, *rope_cache(g, ch, shared, layer.inv_freq))
    heads = {}
    for name, x, n, norm in (("q", q, spec.n_head, layer.q_norm), ("k", k, spec.n_kv_head, layer.k_norm),
                             ("v", v, spec.n_kv_head, None)):
        x = _heads(g, f"{path}/{name}/Reshape", x, n, spec.head_dim)
        if norm:
            x = rms_norm(g, ch, f"{path}/{name}_norm", x, norm, spec.norm_eps)
        if name != "v":
            x = rope_standard(g, spec, f"{path}/{name}_rotary", x, cos, sin)
        heads[name] = g.op("Transpose", [x], f"{path}/{name}/Transpose", perm=[0, 2, 1, 3])   # (b, n, s, d)
    keys = g.node("Concat", [past[0], heads["k"]], f"{path}/k/Concat", outputs=[present[0]], axis=2)[0]
    values = g.node("Concat", [past[1], heads["v"]], f"{path}/v/Concat", outputs=[present[1]], axis=2)[0]
    group = spec.n_head // spec.n_kv_head
    if group > 1:
        keys, values = (_repeat_kv(g, f"{path}/{name}", x, group, spec) for name, x in (("k", keys), ("v", values)))
    query = g.op("Mul", [heads["q"], g.constant(spec.attention_scale, ch.np_io)], f"{path}/q/Scale")
    scores = g.op("MatMul", [query, g.op("Transpose", [keys], f"{path}/k/TransposeT", perm=[0, 1, 3, 2])],
                  f"{path}/QK/MatMul")
    if softcap:
        cap = g.constant(softcap, ch.np_io)
        scores = g.op("Mul", [g.op("Tanh", [g.op("Div", [scores, cap], f"{path}/softcap/Div")],
                                   f"{path}/softcap/Tanh"), cap], f"{path}/softcap/Mul")
    scores = g.op("Add", [scores, additive_mask(g, ch, shared, layer.window)], f"{path}/Mask")
    probs = g.op("Softmax", [scores], f"{path}/Softmax", axis=-1)
    out = g.op("Transpose", [g.op("MatMul", [probs, values], f"{path}/PV/MatMul")], f"{path}/out/Transpose",
               perm=[0, 2, 1, 3])
    return _merge_heads(g, f"{path}/out/Reshape", out, spec.n_head * spec.head_dim)


def _repeat_kv(g: GraphBuilder, path: str, x: str, group: int, spec: ModelSpec) -> str:
    """(b, kv, t, d) -> (b, kv * group, t, d): query head j reads kv head j // group."""
    wide = g.op("Unsqueeze", [x, g.constant([2], np.int64)], f"{path}/Unsqueeze")
    wide = g.op("Expand", [wide, g.constant([1, 1, group, 1, 1], np.int64)], f"{path}/Expand")
    return g.op("Reshape", [wide, g.constant([0, spec.n_head, -1, spec.head_dim], np.int64)], f"{path}/Repeat")
