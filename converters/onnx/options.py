"""What an ONNX export looks like, as tables: precisions, and which ops each execution provider runs.

``resolve(type, provider, ...)`` turns the user's request into a ``Choices`` record: the weight format of
every MatMul, the I/O (activation and KV-cache) dtype, and which of ONNX Runtime's contrib ops the graph
may use. Every choice that differs from what was asked (a provider that cannot run an op, an accuracy
level that does not apply) is returned as a note, never made silently (STYLE.md 6). Pure: reads no files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto

from edgellm.backends import BACKENDS
from edgellm.converters.onnx import quant
from edgellm.errors import UnknownQuantTypeError, UsageError

# other spellings of the precisions (llama.cpp's and numpy's)
PRECISION_ALIASES = {"f32": "fp32", "float32": "fp32", "f16": "fp16", "float16": "fp16", "q8": "int8", "q4": "int4"}
# MatMulNBits accuracy_level (ContribOperators.md): 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
BLOCK_SIZES = (16, 32, 64, 128, 256)          # MatMulNBits: a power of two >= 16
TABLE_BLOCK_8BIT = 128


@dataclass(frozen=True)
class Precision:
    """One ``--type``: how linear-layer weights are stored."""

    name: str
    bits: int | None            # MatMulNBits bits; None = plain float MatMul weights
    float_type: str             # dtype of float weights and, unless the provider overrides it, of the I/O
    description: str


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", None, "float32", "float32 weights and activations"),
    Precision("fp16", None, "float16", "float16 weights and activations (for GPU providers; slow on CPU)"),
    Precision("int8", 8, "float32", "8-bit block-quantized MatMulNBits weights"),
    Precision("int4", 4, "float32", "4-bit block-quantized MatMulNBits weights"),
)}


@dataclass(frozen=True)
class ProviderOps:
    """Which ONNX Runtime contrib ops an execution provider runs for LLM graphs, and its defaults.

    Facts from ORT GenAI's builder (is_gqa_supported, is_fused_rope_supported; reference/onnx-and-devices.md
    1.3/1.4) and ORT 1.32's CPU kernels (checked by the tests in tests/test_onnx_*.py).
    """

    name: str                       # short name, the ``api`` column of edgellm.backends.BACKENDS
    gqa: bool                       # com.microsoft GroupQueryAttention (else MatMul/Softmax attention)
    fused_rope: bool                # RoPE inside GQA (do_rotary=1; the graph then has no position_ids input)
    contrib_norms: bool             # (Skip)SimplifiedLayerNormalization (else ReduceMean/Sqrt/Div)
    matmul_nbits: bool              # MatMulNBits (else DequantizeLinear with block_size -> MatMul, opset 21)
    quantized_io: str               # I/O dtype of int4/int8 models
    accuracy_level: int             # MatMulNBits default accuracy_level
    genai_name: str | None          # provider key in genai_config.json session_options (None: CPU, none needed)
    note: str = ""                  # why the provider gets this op set


PROVIDERS: dict[str, ProviderOps] = {p.name: p for p in (
    ProviderOps("cpu", True, True, True, True, "float32", 4, None,
                "int4/int8 use int8 activations (accuracy_level 4), as ORT GenAI's CPU models"),
    ProviderOps("cuda", True, True, True, True, "float16", 0, "cuda"),
    # TensorRT runs the standard nodes; ORT places the contrib ops it cannot build on the CUDA provider
    ProviderOps("tensorrt", True, True, True, True, "float16", 0, "cuda",
                "contrib ops fall back to the CUDA provider inside TensorRT sessions"),
    ProviderOps("dml", True, False, True, True, "float16", 0, "dml",
                "DirectML's GroupQueryAttention has no fused rotary embedding (ORT GenAI uses RotaryEmbedding)"),
    ProviderOps("openvino", False, False, False, False, "float32", 0, "OpenVINO",
                "OpenVINO compiles standard ONNX ops; contrib ops would fall back to the CPU"),
    ProviderOps("qnn", False, False, False, False, "float32", 0, "QNN",
                "QNN needs standard ops and, for the NPU, a context binary compiled for the SoC (QAIRT)"),
    ProviderOps("coreml", False, False, False, False, "float32", 0, None,
                "Core ML runs no contrib ops; standard ops keep the nodes it supports off the CPU"),
)}

# numpy dtype name -> ONNX element type
ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


@dataclass(frozen=True)
class Choices:
    """Every decision of an export, with the reasons for those that differ from the request."""

    precision: Precision
    provider: ProviderOps
    io_dtype: str                   # activations, logits and KV cache: "float32" or "float16"
    block_size: int
    symmetric: bool
    accuracy_level: int
    lm_head_bits: int | None        # bits of the output projection (None: float)
    embed_bits: int | None          # bits of the embedding table (GatherBlockQuantized; None: float Gather)
    context_length: int             # positions the RoPE caches cover (genai_config context_length)
    share_embeddings: bool = False  # tied quantized models: one copy of the table for Gather and output
    quant_method: str = "mse"       # symmetric block scales: "rtn" (Q4_0's) or "mse" (searched), see quant.py
    table_block_size: int = 32      # blocks of the quantized embedding table and output projection
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def np_io(self) -> np.dtype:
        return np.dtype(self.io_dtype)

    @property
    def onnx_io(self) -> int:
        return ONNX_TYPES[self.io_dtype]

    @property
    def float_weights(self) -> np.dtype:
        """dtype of weights that stay float (embeddings, norms, and all matrices of fp32/fp16 models)."""
        return np.dtype(self.io_dtype)

    def to_dict(self) -> dict:
        return {"type": self.precision.name, "provider": self.provider.name, "io_dtype": self.io_dtype,
                "block_size": self.block_size if self.precision.bits else None,
                "symmetric": self.symmetric if self.precision.bits else None,
                "quant_method": self.quant_method if self.precision.bits else None,
                "accuracy_level": self.accuracy_level if self.precision.bits else None,
                "lm_head_bits": self.lm_head_bits, "embed_bits": self.embed_bits,
                "share_embeddings": self.share_embeddings, "table_block_size": self.table_block_size,
                "context_length": self.context_length,
                "ops": {"group_query_attention": self.provider.gqa, "fused_rope": self.provider.fused_rope,
                        "contrib_norms": self.provider.contrib_norms, "matmul_nbits": self.provider.matmul_nbits},
                "notes": list(self.notes)}


def provider_names() -> list[str]:
    return list(PROVIDERS)


def _provider(name: str) -> ProviderOps:
    key = name.lower().removeprefix("onnxruntime-").removesuffix("executionprovider")
    by_ort = {b.ort_provider.lower().removesuffix("executionprovider"): b.api for b in BACKENDS.values()
              if b.ort_provider}
    key = by_ort.get(key, key)
    if key not in PROVIDERS:
        raise UnknownQuantTypeError(kind="ONNX execution provider", name=name, known=provider_names())
    return PROVIDERS[key]


def resolve(type: str = "fp32", provider: str = "cpu", *, block_size: int = 32, symmetric: bool = True,
            accuracy_level: int | None = None, lm_head: str | None = None, context_length: int | None = None,
            share_embeddings: bool = False, quant_method: str = "mse", trained_context: int) -> Choices:
    """The ``Choices`` of an export. ``lm_head`` is "int8", "int4" or "float" (default: the model's bits,
    int8 under int4 as llama.cpp keeps its output tensor wider). ``context_length`` defaults to the trained
    context (``trained_context``). ``share_embeddings``: see ``decoder._embeddings``. ``quant_method``: see
    ``quant.quantize``.

    Raises:
        UnknownQuantTypeError: an unknown type or provider.
        UsageError: a block size, accuracy level or lm_head value out of range.
    """
    key = PRECISION_ALIASES.get(type.lower(), type.lower())
    if key not in PRECISIONS:
        raise UnknownQuantTypeError(kind="ONNX type", name=type, known=list(PRECISIONS))
    precision, ops = PRECISIONS[key], _provider(provider)
    notes: list[str] = []
    if block_size not in BLOCK_SIZES:
        raise UsageError(problem=f"block size {block_size} is not supported",
                         hint_text=f"use one of {', '.join(map(str, BLOCK_SIZES))}")
    if quant_method not in quant.METHODS:
        raise UsageError(problem=f"quantization method {quant_method!r} is not one of {', '.join(quant.METHODS)}",
                         hint_text="rtn: round to nearest as Q4_0; mse: per-block scale search (default)")
    if precision.bits and not symmetric and quant_method == "mse":
        notes.append("asymmetric blocks span [min, max] (round to nearest); the mse scale search is for "
                     "symmetric blocks")
    if accuracy_level is not None and accuracy_level not in ACCURACY_LEVELS:
        raise UsageError(problem=f"accuracy level {accuracy_level} is not one of {ACCURACY_LEVELS}",
                         hint_text="0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations")
    io = precision.float_type if precision.bits is None else ops.quantized_io
    if precision.name == "fp16" and ops.name == "cpu":
        notes.append("fp16 on the CPU provider: ONNX Runtime casts most nodes back to fp32 (slow); "
                     "use fp32 or int4 for CPU targets")
    if precision.bits and not ops.matmul_nbits:
        notes.append(f"{ops.name}: weights stored as {precision.bits}-bit DequantizeLinear blocks + MatMul "
                     f"(standard ops) instead of MatMulNBits; {ops.note}")
    if not ops.gqa:
        notes.append(f"{ops.name}: attention built from standard ops (MatMul/Softmax with an explicit mask), "
                     f"not GroupQueryAttention; {ops.note}")
    level = ops.accuracy_level if accuracy_level is None else accuracy_level
    if precision.bits and ops.name == "cpu" and level != 4:
        notes.append(f"accuracy_level {level} on the CPU: exact float products, but ONNX Runtime 1.32 runs them "
                     "far slower (measured 30x on Gemma 3 270M int4) than level 4's int8 kernels")
    if precision.bits and level == 4 and io != "float32":
        notes.append(f"accuracy_level 4 needs float32 activations; using 0 with {io} I/O")
        level = 0
    head_bits = _lm_head_bits(precision, lm_head)
    # the table is stored like the output projection (and shares its codes when tied); providers without
    # contrib ops get a float table, since dequantizing it whole for every call would cost more than it saves
    embed_bits = head_bits if ops.matmul_nbits else None
    if head_bits and not ops.matmul_nbits:
        notes.append(f"{ops.name}: embedding table kept in {io} (no GatherBlockQuantized without contrib ops)")
    ctx = int(context_length or trained_context)
    if ctx <= 0:
        raise UsageError(problem=f"context length {ctx} must be positive", hint_text="pass --context N with N > 0")
    # 8-bit tables: blocks of 128 (fp32 scales cost 1/32 of a byte a weight, not 1/8; the output projection is
    # the largest matrix Gemma reads per token); 4-bit ones keep the model's block size
    table_block = max(block_size, TABLE_BLOCK_8BIT) if head_bits == 8 else block_size
    return Choices(precision, ops, io, block_size, symmetric, level, head_bits, embed_bits, ctx, share_embeddings,
                   quant_method, table_block, tuple(notes))


LM_HEAD_CHOICES = {"int8": 8, "int4": 4, "float": None}


def _lm_head_bits(precision: Precision, lm_head: str | None) -> int | None:
    if lm_head is None:
        return 8 if precision.bits == 4 else precision.bits
    if lm_head not in LM_HEAD_CHOICES:
        raise UsageError(problem=f"lm_head {lm_head!r} is not one of {', '.join(LM_HEAD_CHOICES)}",
                         hint_text="int8 keeps the output projection more accurate than int4")
    if LM_HEAD_CHOICES[lm_head] is not None and precision.bits is None:
        raise UsageError(problem=f"lm_head {lm_head} needs a quantized --type (int8 or int4), not {precision.name}",
                         hint_text="drop --lm-head or pick --type int4")
    return LM_HEAD_CHOICES[lm_head]


ROPE_CACHE_MULTIPLE = 8       # GroupQueryAttention: "cos_cache dimension 1 must be <= head_size / 2 and a multiple of 8"


def for_model(ch: Choices, rope_dim: int) -> Choices:
    """``ch`` adjusted to a model: fused RoPE needs rope_dim / 2 to be a multiple of 8 (ORT 1.32's GQA check;
    partial-rotary models may miss it), else RotaryEmbedding nodes rotate Q and K before GQA (noted)."""
    if not ch.provider.fused_rope or (rope_dim // 2) % ROPE_CACHE_MULTIPLE == 0:
        return ch
    note = (f"RoPE not fused into GroupQueryAttention: it needs rotary dims / 2 to be a multiple of "
            f"{ROPE_CACHE_MULTIPLE}, this model rotates {rope_dim}; RotaryEmbedding nodes and a position_ids input")
    return dataclasses.replace(ch, provider=dataclasses.replace(ch.provider, fused_rope=False),
                               notes=ch.notes + (note,))
