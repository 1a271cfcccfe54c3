"""llama.cpp quantization types as data: file types (``LLAMA_FTYPE_*``) and ggml tensor types.

Facts are taken from llama.cpp as vendored by llama-cpp-python 0.3.36 (ggml-org/llama.cpp@0c1e57098):
``src/llama-quant.cpp`` (``llama_ftype_get_default_type``, ``tensor_requires_imatrix``,
``tensor_type_fallback``), ``ggml/src/ggml.c`` (``ggml_quantize_requires_imatrix``) and
``tools/quantize/quantize.cpp`` (``QUANT_OPTIONS`` names and aliases). Block layouts come from
``gguf.GGML_QUANT_SIZES`` (gguf-py writes them as layout arithmetic, e.g. ``Q4_K: (256, 2 + 2 + 256 // 2 + 12)``),
so bits per weight are derived here, never typed in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import gguf
import numpy as np

from edgellm.errors import ImatrixRequiredError, QuantTypeRowError, UnknownQuantTypeError, UsageError


@dataclass(frozen=True)
class GgmlType:
    """One ggml tensor type: its enum value and block layout."""

    name: str            # ggml spelling, e.g. "Q4_K"
    value: int           # enum ggml_type
    block_size: int      # weights per block (a row's length must be a multiple of it)
    type_size: int       # bytes per block

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    @property
    def needs_imatrix(self) -> bool:
        """llama.cpp refuses this type for a layer weight without importance data (tensor_requires_imatrix)."""
        return self.name in _LLAMA_REQUIRES_IMATRIX

    @property
    def aborts_without_imatrix(self) -> bool:
        """ggml_quantize_chunk GGML_ASSERTs (kills the process) when no importance data is passed."""
        return self.name in _GGML_ASSERTS_WITHOUT_IMATRIX

    def fits_row(self, n_per_row: int) -> bool:
        """Whether a row of ``n_per_row`` weights splits into whole blocks of this type."""
        return n_per_row % self.block_size == 0

    def row_bytes(self, n_per_row: int) -> int:
        return n_per_row // self.block_size * self.type_size


@dataclass(frozen=True)
class FileType:
    """One llama.cpp file type (a recipe): the ftype enum, its main tensor type and whether it needs an imatrix."""

    name: str            # llama-quantize spelling, e.g. "Q4_K_M"
    ftype: int           # enum llama_ftype
    main: str            # ggml type most layer weights get (llama_ftype_get_default_type)
    needs_imatrix: bool  # llama.cpp refuses it without an importance matrix
    note: str = ""

    @property
    def main_type(self) -> GgmlType:
        return GGML_TYPES[self.main]

    @property
    def nominal_bits_per_weight(self) -> float:
        """Bits per weight of the main type; a recipe's real average differs (embeddings, attn_v, ffn_down)."""
        return self.main_type.bits_per_weight


# ggml types llama_model_quantize can produce (ggml_quantize_chunk has a kernel for them) and that the CPU
# backend runs; usable as --output-tensor-type / --token-embedding-type / --tensor-type values.
# (Q8_1 and Q8_K are dot-product intermediates; NVFP4/Q1_0 are too new to rely on.)
_OVERRIDE_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_NL", "MXFP4",
    "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS",
    "IQ1_M", "IQ1_S", "TQ2_0", "TQ1_0",
)

# llama-quant.cpp tensor_requires_imatrix: these types on any tensor but token_embd/output need an imatrix.
_LLAMA_REQUIRES_IMATRIX = frozenset({"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"})
# ggml.c ggml_quantize_requires_imatrix: GGML_ASSERT(imatrix != NULL) inside the quantizer, even for
# token_embd/output, which llama.cpp exempts from the check above. Reaching it aborts the process.
_GGML_ASSERTS_WITHOUT_IMATRIX = frozenset({"IQ2_XXS", "IQ2_XS", "IQ1_S"})

GGML_TYPES: dict[str, GgmlType] = {
    name: GgmlType(name, gguf.GGMLQuantizationType[name].value, *gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]])
    for name in _OVERRIDE_TYPES
}

# What llama.cpp itself substitutes when a row does not split into blocks (llama-quant.cpp tensor_type_fallback);
# used to suggest a type in our error messages. Q8_0 is the lossless-enough last resort for 32-divisible rows.
ROW_FALLBACK: dict[str, str] = {
    "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
    "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL",
    "Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0",
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}

# name, llama_ftype, main ggml type, needs imatrix, note
_FILE_TYPE_ROWS = (
    ("F32", 0, "F32", False, "no quantization"),
    ("F16", 1, "F16", False, ""),
    ("BF16", 32, "BF16", False, ""),
    ("Q8_0", 7, "Q8_0", False, ""),
    ("Q4_0", 2, "Q4_0", False, "legacy"),
    ("Q4_1", 3, "Q4_1", False, "legacy"),
    ("Q5_0", 8, "Q5_0", False, "legacy"),
    ("Q5_1", 9, "Q5_1", False, "legacy"),
    ("Q2_K", 10, "Q2_K", False, ""),
    ("Q2_K_S", 21, "Q2_K", True, "Q2_K tensors of a Q2_K_S file need importance data"),
    ("Q3_K_S", 11, "Q3_K", False, ""),
    ("Q3_K_M", 12, "Q3_K", False, ""),
    ("Q3_K_L", 13, "Q3_K", False, ""),
    ("Q4_K_S", 14, "Q4_K", False, ""),
    ("Q4_K_M", 15, "Q4_K", False, ""),
    ("Q5_K_S", 16, "Q5_K", False, ""),
    ("Q5_K_M", 17, "Q5_K", False, ""),
    ("Q6_K", 18, "Q6_K", False, ""),
    ("IQ4_NL", 25, "IQ4_NL", False, "32-wide blocks"),
    ("IQ4_XS", 30, "IQ4_XS", False, ""),
    ("IQ3_M", 27, "IQ3_S", False, ""),
    ("IQ3_S", 26, "IQ3_S", False, ""),
    ("IQ3_XS", 22, "IQ3_S", True, "attn_q/attn_k and middle ffn_gate/up become IQ3_XXS"),
    ("IQ3_XXS", 23, "IQ3_XXS", True, ""),
    ("IQ2_M", 29, "IQ2_S", True, ""),
    ("IQ2_S", 28, "IQ2_XS", True, ""),
    ("IQ2_XS", 20, "IQ2_XS", True, ""),
    ("IQ2_XXS", 19, "IQ2_XXS", True, ""),
    ("IQ1_M", 31, "IQ1_M", True, ""),
    ("IQ1_S", 24, "IQ1_S", True, ""),
    ("TQ2_0", 37, "TQ2_0", False, "ternary; only for ternary-trained models"),
    ("TQ1_0", 36, "TQ1_0", False, "ternary; only for ternary-trained models"),
)

FILE_TYPES: dict[str, FileType] = {row[0]: FileType(*row) for row in _FILE_TYPE_ROWS}

# llama-quantize accepts these spellings too (QUANT_OPTIONS "alias for ...").
FILE_TYPE_ALIASES: dict[str, str] = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# Types the converter writes itself, without llama.cpp (gguf-py has numpy quantizers for them).
WRITER_TYPES = frozenset({"F32", "F16", "BF16", "Q8_0"})
# Unquantized types: llama.cpp applies --tensor-type patterns only when a file type's main type is not one of them.
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})


def file_type(name: str) -> FileType:
    """The file type called ``name`` (case-insensitive; ``Q4_K`` means ``Q4_K_M`` as in llama-quantize).

    Raises:
        UnknownQuantTypeError: for a name llama.cpp does not know.
    """
    key = name.strip().upper()
    key = FILE_TYPE_ALIASES.get(key, key)
    if key not in FILE_TYPES:
        raise UnknownQuantTypeError(name=name, kind="file type", known=list(FILE_TYPES))
    return FILE_TYPES[key]


def ggml_type(name: str) -> GgmlType:
    """The ggml tensor type called ``name`` (case-insensitive, e.g. ``q5_0``) for a per-tensor override.

    Raises:
        UnknownQuantTypeError: for a name that is not a ggml type llama.cpp can quantize to.
    """
    key = name.strip().upper()
    if key not in GGML_TYPES:
        raise UnknownQuantTypeError(name=name, kind="tensor type", known=list(GGML_TYPES))
    return GGML_TYPES[key]


def ggml_type_by_value(value: int) -> str:
    """The ggml spelling of enum value ``value`` (any type gguf-py knows, not only override types)."""
    return gguf.GGMLQuantizationType(value).name


def row_alternatives(wanted: GgmlType, n_per_row: int) -> list[str]:
    """Types to suggest when ``wanted`` does not fit rows of ``n_per_row``: llama.cpp's own fallback, then Q8_0."""
    candidates = [ROW_FALLBACK.get(wanted.name, ""), "Q8_0", "F16"]
    return [c for c in dict.fromkeys(candidates) if c and GGML_TYPES[c].fits_row(n_per_row)]


# ---------------------------------------------------------------------------------------------------------------
# Tensors, and which forced type lands on which of them (pure: callers read the tensor infos)
# ---------------------------------------------------------------------------------------------------------------

TOKEN_EMBD = ("token_embd.weight", "per_layer_token_embd.weight")   # llama-quant.cpp tensor_name_match_token_embd
OUTPUT = "output.weight"

# llama-quant.cpp tensor_allows_quantization: weights whose name contains one of these stay as they are.
_NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight", "attn_rel_b.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight",
    "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", ".position_embd", ".rel_pos", ".patch_embd",
    ".patch_merger", "sam.pos_embd", "sam.neck.", "sam.net_", "a.rvq.codebook", "mm.a.code_embd",
)
_NEVER_QUANTIZED_NAMES = frozenset({"position_embd.weight", "token_types.weight"})


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file as its header describes it."""

    name: str
    ne: tuple[int, ...]   # ggml order: ne[0] is the row length (input columns of a weight matrix)
    type: str             # ggml spelling, e.g. "F16", "Q4_K"
    offset: int = 0       # bytes from the start of the file's tensor data

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.ne, dtype=np.int64))

    @property
    def n_dims(self) -> int:
        """As ggml_n_dims: trailing 1-sized dimensions do not count."""
        dims = list(self.ne)
        while len(dims) > 1 and dims[-1] == 1:
            dims.pop()
        return len(dims)

    @property
    def n_bytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.type]]
        return self.n_elements // block * size


@dataclass(frozen=True)
class ExplicitTypes:
    """The types a caller forced, resolved; ``overrides`` keeps llama.cpp's order (the first matching pattern wins)."""

    output: GgmlType | None = None
    embedding: GgmlType | None = None
    overrides: tuple[tuple[str, GgmlType], ...] = ()


def is_quantizable(info: TensorInfo) -> bool:
    """Whether llama.cpp would quantize this tensor at all (llama-quant.cpp tensor_allows_quantization)."""
    name = info.name
    return (info.n_dims >= 2 and name.endswith("weight") and name not in _NEVER_QUANTIZED_NAMES
            and not any(part in name for part in _NEVER_QUANTIZED))


def explicit_assignments(tensors: Sequence[TensorInfo], types: ExplicitTypes) -> list[tuple[TensorInfo, GgmlType, str]]:
    """(tensor, forced type, option that forced it) for every tensor an explicit type reaches.

    Follows llama-quant.cpp llama_tensor_get_type: --token-embedding-type first, then --output-tensor-type on
    output.weight, then the first matching --tensor-type pattern; with tied embeddings (no output.weight) the
    output type also reaches token_embd.weight when nothing above claimed it.
    """
    tied = not any(t.name == OUTPUT for t in tensors)
    result = []
    for info in tensors:
        if not is_quantizable(info):
            continue
        forced = _forced_type(info, types, tied)
        if forced is not None:
            result.append((info, *forced))
    return result


def _forced_type(info: TensorInfo, types: ExplicitTypes, tied: bool) -> tuple[GgmlType, str] | None:
    pattern_hit = next(((p, t) for p, t in types.overrides if re.search(p, info.name)), None)
    if types.embedding and info.name in TOKEN_EMBD:
        # an explicit pattern may name per_layer_token_embd apart from the embedding type (llama-quant.cpp)
        if not (info.name == "per_layer_token_embd.weight" and pattern_hit):
            return types.embedding, "embedding_type"
    if types.output and info.name == OUTPUT:
        return types.output, "output_type"
    if pattern_hit:
        return pattern_hit[1], f"tensor-type pattern {pattern_hit[0]!r}"
    if types.output and tied and info.name == TOKEN_EMBD[0]:   # tied embeddings: token_embd is the output too
        return types.output, "output_type"
    return None


def check_explicit_types(tensors: Sequence[TensorInfo], types: ExplicitTypes, imatrix_names: frozenset[str]) -> None:
    """Refuse forced types llama.cpp cannot apply, before it sees them.

    Raises:
        QuantTypeRowError: a forced type whose block does not divide a tensor's row (ne[0]); for the embedding and
            output types llama.cpp would hit GGML_ASSERT and abort the process, for patterns silently fall back.
        ImatrixRequiredError: a forced type that needs importance data the imatrix does not hold for that tensor.
    """
    for info, gtype, option in explicit_assignments(tensors, types):
        n_per_row = info.ne[0]
        if not gtype.fits_row(n_per_row):
            raise QuantTypeRowError(tensor=info.name, n_per_row=n_per_row, type=gtype.name,
                                    block_size=gtype.block_size, option=option,
                                    alternatives=row_alternatives(gtype, n_per_row))
        exempt = info.name in TOKEN_EMBD or info.name == OUTPUT   # llama.cpp does not ask for these
        needs = gtype.aborts_without_imatrix or (gtype.needs_imatrix and not exempt)
        if needs and info.name not in imatrix_names:
            raise ImatrixRequiredError(type=gtype.name, reason=f"{option} puts it on {info.name}, which the "
                                       "importance matrix does not cover")


def resolve_types(output_type: str | None, embedding_type: str | None,
                  overrides: dict[str, str] | Sequence[tuple[str, str]] | None) -> ExplicitTypes:
    """Parse the caller's type names into ggml types (raises UnknownQuantTypeError, UsageError on a bad regex)."""
    pairs = list(overrides.items()) if isinstance(overrides, dict) else list(overrides or [])
    for pattern, _ in pairs:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UsageError(problem=f"tensor-type pattern {pattern!r} is not a valid regular expression: {exc}",
                             hint_text="patterns are regular expressions searched in tensor names, "
                                       r"e.g. 'ffn_down' or 'blk\.[0-3]\.attn_v'") from None
    return ExplicitTypes(
        output=ggml_type(output_type) if output_type else None,
        embedding=ggml_type(embedding_type) if embedding_type else None,
        overrides=tuple((p, ggml_type(t)) for p, t in pairs),
    )
