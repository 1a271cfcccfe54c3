"""Per-tensor types of a llama.cpp file type, and what the CPU backend repacks. Pure.

The exact types come from llama.cpp itself (a quantizer dry run at the I/O edge, ``ModelFacts.recipes``).
Without one, ``approximate_recipe`` applies the main rules of llama.cpp's ``llama_tensor_get_type_impl``
(src/llama-quant.cpp @0c1e57098) written as a table: which tensor category gets which type for which file
type in which layers, then llama.cpp's row fallback (``tensor_type_fallback``). MoE, Falcon and 70B
special cases are left out: the supported architectures are dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from edgellm.converters.quant_types import FILE_TYPES, FLOAT_TYPES, ROW_FALLBACK, TensorInfo, is_quantizable
from edgellm.fitting.facts import ModelFacts, ModelShape, TensorFact, block_layout

Recipe = Mapping[str, str]          # tensor name -> ggml type

# tensor_get_category: the first name fragment found decides (output/token_embd are exact names). A fused
# attn_qkv counts as attn_v: llama_tensor_get_type_impl tests category_is_attn_v (V, QKV, KV_B) before its
# own ATTENTION_QKV branch, which is therefore never reached.
_CATEGORIES = (("attn_qkv.weight", "attn_v"), ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
               ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"),
               ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"))

_IQ12 = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")


@dataclass(frozen=True)
class Where:
    """The position facts a rule condition may look at."""

    layer: int
    n_layers: int
    n_gqa: int                       # query heads per KV head


def _more_bits(w: Where) -> bool:    # llama-quant.cpp use_more_bits: first/last eighth and every third between
    i, n = w.layer, w.n_layers
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


CONDITIONS: dict[str, Callable[[Where], bool]] = {
    "always": lambda w: True,
    "more_bits": _more_bits,
    "first_8th": lambda w: w.layer < w.n_layers // 8,
    "first_16th": lambda w: w.layer < w.n_layers // 16,
    "first_2": lambda w: w.layer < 2,
    "first_4": lambda w: w.layer < 4,
    "middle": lambda w: w.n_layers // 8 <= w.layer < 7 * w.n_layers // 8,
    "gqa4": lambda w: w.n_gqa >= 4,
    "not_gqa4": lambda w: w.n_gqa < 4,
}

# (category, file types, condition, type): the first matching row wins, else the file type's main type.
# Imatrix-dependent branches assume no importance matrix (fit quantizes without one).
RULES: tuple[tuple[str, tuple[str, ...], str, str], ...] = (
    ("token_embd", ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"), "always", "Q2_K"),
    ("token_embd", ("IQ2_S", "IQ2_M", "IQ3_XXS"), "always", "IQ3_S"),
    ("token_embd", ("TQ1_0", "TQ2_0"), "always", "Q4_K"),
    ("attn_v", _IQ12, "gqa4", "Q4_K"),
    ("attn_v", ("IQ2_S", "IQ2_M"), "always", "IQ3_S"),
    ("attn_v", _IQ12, "always", "Q2_K"),
    ("ffn_down", ("IQ2_S", "IQ2_M"), "first_8th", "IQ3_S"),
    ("ffn_down", _IQ12, "first_8th", "Q2_K"),
    ("attn_output", ("IQ1_S", "IQ1_M"), "always", "IQ2_XXS"),
    ("attn_output", ("IQ2_S", "IQ2_M"), "always", "IQ3_S"),
    ("attn_v", ("Q2_K", "Q2_K_S", "IQ3_XXS", "IQ3_XS", "IQ3_S"), "gqa4", "Q4_K"),
    ("attn_v", ("Q2_K",), "always", "Q3_K"),
    ("attn_v", ("IQ3_XXS",), "always", "IQ3_S"),
    ("attn_v", ("IQ3_M",), "always", "Q4_K"),
    ("attn_v", ("Q3_K_M",), "first_2", "Q5_K"),
    ("attn_v", ("Q3_K_M",), "always", "Q4_K"),
    ("attn_v", ("Q3_K_L",), "always", "Q5_K"),
    ("attn_v", ("IQ4_NL", "IQ4_XS"), "gqa4", "Q5_K"),
    ("attn_v", ("Q4_K_M", "Q5_K_M"), "more_bits", "Q6_K"),
    ("attn_v", ("Q4_K_S",), "first_4", "Q5_K"),
    ("attn_k", ("IQ3_XS",), "always", "IQ3_XXS"),
    ("attn_k", ("IQ3_XXS",), "always", "IQ2_S"),
    ("attn_q", ("IQ3_XS",), "always", "IQ3_XXS"),
    ("attn_q", ("IQ3_XXS",), "always", "IQ2_S"),
    ("ffn_down", ("Q2_K",), "always", "Q3_K"),
    ("ffn_down", ("Q2_K_S", "IQ3_XXS", "IQ3_M"), "first_8th", "Q4_K"),
    ("ffn_down", ("IQ3_XXS",), "always", "Q3_K"),
    ("ffn_down", ("Q3_K_M",), "first_16th", "Q5_K"),
    ("ffn_down", ("Q3_K_M",), "always", "Q4_K"),
    ("ffn_down", ("Q3_K_L",), "always", "Q5_K"),
    ("ffn_down", ("Q4_K_M", "Q5_K_M"), "more_bits", "Q6_K"),
    ("ffn_down", ("IQ4_NL", "IQ4_XS", "Q4_K_S"), "first_8th", "Q5_K"),
    ("attn_output", ("Q2_K",), "always", "Q3_K"),
    ("attn_output", ("IQ3_XXS",), "always", "IQ3_S"),
    ("attn_output", ("Q3_K_M", "IQ3_M"), "always", "Q4_K"),
    ("attn_output", ("Q3_K_L",), "always", "Q5_K"),
    ("ffn_gate", ("IQ3_XS",), "middle", "IQ3_XXS"),
    ("ffn_up", ("IQ3_XS",), "middle", "IQ3_XXS"),
)


def category(name: str, tied: bool) -> str:
    """llama.cpp's tensor category; a tied token_embd counts as the output."""
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    return next((cat for fragment, cat in _CATEGORIES if fragment in name), "other")


def _output_type(file_type: str, row: int) -> str:
    """Type of output.weight (or the tied embedding) when no explicit type is given."""
    main = FILE_TYPES[file_type].main
    if row % block_layout(main)[0]:
        return "Q8_0"
    if file_type in _IQ12 or file_type == "IQ3_XXS":
        return "Q5_K"
    return "Q8_0" if main == "Q8_0" else "Q6_K"


def row_fallback(wanted: str, row: int) -> str:
    """llama.cpp's tensor_type_fallback: a type whose blocks divide the row (else F16)."""
    if row % block_layout(wanted)[0] == 0:
        return wanted
    fallback = ROW_FALLBACK.get(wanted, wanted)
    return fallback if row % block_layout(fallback)[0] == 0 else "F16"


def tensor_type(tensor: TensorFact, file_type: str, where: Where, tied: bool) -> str:
    """The type llama.cpp gives ``tensor`` in a ``file_type`` file (approximation, see module doc)."""
    if not is_quantizable(TensorInfo(tensor.name, tensor.ne, tensor.type)):
        return tensor.type
    main = FILE_TYPES[file_type].main
    if main in FLOAT_TYPES:
        return main
    cat = category(tensor.name, tied)
    if cat == "output":
        wanted = _output_type(file_type, tensor.ne[0])
    else:
        wanted = next((t for c, types, cond, t in RULES if c == cat and file_type in types and CONDITIONS[cond](where)),
                      main)
    return row_fallback(wanted, tensor.ne[0])


def approximate_recipe(tensors: tuple[TensorFact, ...], shape: ModelShape, file_type: str) -> dict[str, str]:
    """Tensor name -> ggml type for ``file_type`` by the rules table (llama.cpp's own dry run is exact)."""
    tied = not any(t.name == "output.weight" for t in tensors)
    n_gqa = max(1, shape.n_head // max(1, shape.n_kv_head))
    return {t.name: tensor_type(t, file_type, Where(t.layer or 0, shape.n_layers, n_gqa), tied) for t in tensors}


def recipe(facts: ModelFacts, file_type: str) -> tuple[dict[str, str], bool]:
    """(tensor -> type, exact) for a candidate file type: llama.cpp's answer when known, else the table.

    ``"SOURCE"`` keeps the source's types (a GGUF used as it is).
    """
    if file_type == "SOURCE":
        return {t.name: t.type for t in facts.tensors}, True
    if file_type in facts.recipes:
        return dict(facts.recipes[file_type]), True
    return approximate_recipe(facts.tensors, facts.shape, file_type), False


def weight_bytes(tensors: tuple[TensorFact, ...], types: Recipe) -> int:
    """Exact tensor data bytes when each tensor is stored as ``types[name]``."""
    return sum(t.bytes_as(types.get(t.name, t.type)) for t in tensors)


# ggml-cpu repack.cpp ggml_repack_get_optimal_repack_type: on these CPUs the CPU backend copies tensors of
# these types (with ne[1] a multiple of the interleave) into an interleaved buffer at load time, an
# anonymous copy on top of the memory-mapped file. (type, cpu features all required, rows multiple)
REPACK_RULES: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("Q4_0", ("avx2",), 8), ("Q4_0", ("asimd", "i8mm"), 4), ("Q4_0", ("asimd", "dotprod"), 4),
    ("Q4_K", ("avx2",), 8), ("Q4_K", ("asimd", "i8mm"), 8), ("Q4_K", ("asimd", "dotprod"), 8),
    ("Q2_K", ("avx512f",), 8),
    ("Q5_K", ("asimd", "i8mm"), 8), ("Q5_K", ("asimd", "dotprod"), 8),
    ("Q6_K", ("asimd", "i8mm"), 8), ("Q6_K", ("asimd", "dotprod"), 8),
    ("IQ4_NL", ("avx2",), 8), ("IQ4_NL", ("asimd", "dotprod"), 4),
    ("MXFP4", ("avx2",), 8), ("MXFP4", ("asimd", "dotprod"), 4),
    ("Q8_0", ("asimd", "i8mm"), 4), ("Q8_0", ("asimd", "dotprod"), 4),
)


def is_repacked(tensor: TensorFact, ggml_type: str, cpu_features: frozenset[str], tied: bool = False) -> bool:
    """Whether llama.cpp's CPU backend keeps an interleaved copy of this weight (first matching rule).

    Input embeddings are looked up row by row (get_rows) and stay in the mapped file; a tied embedding is
    also the output matrix, which llama.cpp loads a second time (TENSOR_DUPLICATED) into the output's
    buffer type, so it is repacked like any matrix.
    """
    embedding = tensor.name in ("token_embd.weight", "per_layer_token_embd.weight")
    if (embedding and not (tied and tensor.name == "token_embd.weight")) or len(tensor.ne) < 2:
        return False
    rule = next((r for r in REPACK_RULES if r[0] == ggml_type and set(r[1]) <= cpu_features), None)
    return rule is not None and tensor.ne[1] % rule[2] == 0


def repacked_bytes(tensors: tuple[TensorFact, ...], types: Recipe, cpu_features: frozenset[str]) -> int:
    """Bytes the CPU backend copies into its repack buffer at load."""
    tied = not any(t.name == "output.weight" for t in tensors)
    return sum(t.bytes_as(types[t.name]) for t in tensors if is_repacked(t, types[t.name], cpu_features, tied))
