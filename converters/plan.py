"""Which GGUF tensors a checkpoint becomes: names, shapes and storage types, decided from headers alone.

``plan_tensors`` maps every checkpoint tensor through the architecture's table, checks its dtype and the
shape config.json implies, refuses unknown or missing tensors, and picks each output type with the rules
of llama.cpp's ``prepare_tensors``: 1-D tensors and norms stay F32, everything else takes the file type.
No tensor data is read here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from math import prod

import gguf
import numpy as np

from edgellm.converters.archs.common import Architecture, Context, TensorRow, is_skipped, normalize_name
from edgellm.converters.checkpoint import FLOAT_DTYPES, Checkpoint
from edgellm.converters.spec import ModelSpec
from edgellm.errors import CheckpointError

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
K = gguf.MODEL_TENSOR


@dataclass(frozen=True)
class OutputType:
    """A type the converter writes itself: the GGUF file type and the ggml type of quantizable tensors."""

    name: str
    file_type: gguf.LlamaFileType
    main: gguf.GGMLQuantizationType


OUTPUT_TYPES: dict[str, OutputType] = {t.name: t for t in (
    OutputType("F32", gguf.LlamaFileType.ALL_F32, Q.F32),
    OutputType("F16", gguf.LlamaFileType.MOSTLY_F16, Q.F16),
    OutputType("BF16", gguf.LlamaFileType.MOSTLY_BF16, Q.BF16),
    OutputType("Q8_0", gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
)}

# GGUF tensors llama.cpp keeps in F32 whatever the file type (prepare_tensors; the same list
# llama_model_quantize never quantizes): routers, position embeddings, convolutions, RWKV mixing.
ALWAYS_F32 = frozenset({
    K.FFN_GATE_INP, K.FFN_GATE_INP_SHEXP, K.POS_EMBD, K.TOKEN_TYPES, K.SSM_CONV1D, K.SHORTCONV_CONV,
    K.TIME_MIX_FIRST, K.TIME_MIX_W1, K.TIME_MIX_W2, K.TIME_MIX_DECAY_W1, K.TIME_MIX_DECAY_W2,
    K.TIME_MIX_LERP_FUSED, K.POSNET_NORM1, K.POSNET_NORM2, K.V_ENC_EMBD_POS, K.A_ENC_EMBD_POS,
    K.ALTUP_CORRECT_COEF, K.ALTUP_PREDICT_COEF, K.SSM_CONV1D_Q, K.SSM_CONV1D_K, K.SSM_CONV1D_V, K.INDEXER_PROJ,
})

ITEM_BYTES = {Q.F32: 4, Q.F16: 2}


@dataclass(frozen=True)
class TensorPlan:
    """One GGUF tensor to write."""

    name: str                               # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]                  # element shape, PyTorch order (GGUF stores it reversed)
    qtype: gguf.GGMLQuantizationType
    source: str | None = None               # HF tensor name (None for generated tensors)
    row: TensorRow | None = None
    data: np.ndarray | None = None          # generated tensors only (small: rope factors)

    @property
    def n_elements(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        if self.qtype in ITEM_BYTES:
            return self.n_elements * ITEM_BYTES[self.qtype]
        return prod(gguf.quant_shape_to_byte_shape(self.shape, self.qtype))


def tensor_type(name: str, key: gguf.MODEL_TENSOR | None, shape: tuple[int, ...], out: OutputType) -> tuple[
        gguf.GGMLQuantizationType, str | None]:
    """(ggml type, note) for a tensor: llama.cpp's rules, and F16 where a Q8_0 block does not fit a row."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or key in ALWAYS_F32 or not name.endswith(".weight"):
        return Q.F32, None
    block = gguf.GGML_QUANT_SIZES[out.main][0]
    if shape[-1] % block:
        # gguf.quants raises QuantError here and llama.cpp's converter falls back to F16
        return Q.F16, f"{name}: rows of {shape[-1]} do not split into {out.name} blocks of {block}, stored as F16"
    return out.main, None


def name_index(arch: Architecture, spec: ModelSpec) -> dict[str, tuple[TensorRow, int | None]]:
    """Every concrete HF tensor name the table knows for this spec -> (row, layer index)."""
    index: dict[str, tuple[TensorRow, int | None]] = {}
    for row in arch.tensors:
        for bid in (range(spec.n_layers) if row.per_layer else (None,)):
            index[row.hf.format(bid=bid)] = (row, bid)
    return index


def plan_tensors(ckpt: Checkpoint, arch: Architecture, ctx: Context, out: OutputType) -> tuple[
        list[TensorPlan], list[str]]:
    """The GGUF tensors of ``ckpt`` in llama.cpp's order (generated ones first) and notes on type choices.

    Raises:
        CheckpointError: a tensor the architecture does not have, a missing required tensor, a non-float
            dtype, or a shape that disagrees with config.json.
    """
    plans, notes = [], []
    for name, data in arch.extra_tensors(ctx.hparams, ctx.spec):
        plans.append(TensorPlan(name, data.shape, Q.F32, data=data))
    index = name_index(arch, ctx.spec)
    seen: dict[str, str] = {}
    for hf_name, (_, info) in ckpt.tensors.items():
        name = normalize_name(hf_name)
        if name not in index:
            if is_skipped(name, arch):
                continue
            raise _bad(ckpt, f"tensor {hf_name!r} is not part of a {arch.name} checkpoint with "
                             f"{ctx.spec.n_layers} layers (config.json num_hidden_layers)")
        if name in seen:
            raise _bad(ckpt, f"tensors {seen[name]!r} and {hf_name!r} are the same model tensor")
        seen[name] = hf_name
        row, bid = index[name]
        _check(ckpt, hf_name, info.dtype, info.shape, row.shape(ctx.spec))
        shape = row.out_shape(info.shape, ctx)
        gguf_name = row.gguf_name(bid)
        qtype, note = tensor_type(gguf_name, row.key, shape, out)
        notes += [note] if note else []
        plans.append(TensorPlan(gguf_name, tuple(shape), qtype, source=hf_name, row=row))
    missing = [n for n, (row, _) in index.items() if n not in seen and row.required(ctx.spec)]
    if missing:
        raise _bad(ckpt, f"{len(missing)} tensor(s) missing, e.g. {', '.join(missing[:3])}")
    return plans, notes


def _bad(ckpt: Checkpoint, problem: str) -> CheckpointError:
    return CheckpointError(path=str(ckpt.path), problem=problem)


def _check(ckpt: Checkpoint, name: str, dtype: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if dtype not in FLOAT_DTYPES:
        raise _bad(ckpt, f"tensor {name!r} is {dtype}; only {'/'.join(sorted(FLOAT_DTYPES))} weights can be "
                         "converted (quantized checkpoints are not supported)")
    if tuple(shape) != tuple(expected):
        raise _bad(ckpt, f"tensor {name!r} has shape {list(shape)} but config.json implies {list(expected)}")
