"""The checkpoint's tensors by role, read through the converters' one set of per-architecture tables.

``edgellm.converters.archs`` says what each HF tensor is as a GGUF ``MODEL_TENSOR`` key; ``ROLES`` maps
those keys to the part of the decoder graph they feed. The tables' transforms are *not* applied: they
exist for llama.cpp (LLaMA's Q/K permutation to interleaved RoPE, Gemma's embedding trim), while the
ONNX graph uses Hugging Face's rotate-half layout and full vocabulary as stored. Gemma's ``x * (1 + w)``
norms come from ``ModelSpec.norm_weight_offset`` instead.

Tensors stay memory-mapped; ``rows`` widens a slice at a time to float32 and ``release`` drops pages
that are done, so a conversion holds about one tensor in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from edgellm.converters.archs.common import Architecture, Context, normalize_name
from edgellm.converters.checkpoint import Checkpoint
from edgellm.converters.plan import OUTPUT_TYPES, name_index, plan_tensors
from edgellm.converters.spec import ModelSpec
from edgellm.converters.writer import first_bad_value, working_array
from edgellm.errors import CheckpointError

K = gguf.MODEL_TENSOR

# GGUF tensor key -> role in the decoder graph ("_bias" is appended for .bias tensors)
ROLES: dict[gguf.MODEL_TENSOR, str] = {
    K.TOKEN_EMBD: "embed", K.OUTPUT_NORM: "final_norm", K.OUTPUT: "lm_head",
    K.ATTN_NORM: "attn_norm", K.ATTN_Q: "q", K.ATTN_K: "k", K.ATTN_V: "v", K.ATTN_QKV: "qkv",
    K.ATTN_OUT: "o", K.ATTN_Q_NORM: "q_norm", K.ATTN_K_NORM: "k_norm", K.ATTN_POST_NORM: "attn_post_norm",
    K.FFN_NORM: "ffn_norm", K.FFN_PRE_NORM: "ffn_norm", K.FFN_POST_NORM: "ffn_post_norm",
    K.FFN_GATE: "gate", K.FFN_UP: "up", K.FFN_DOWN: "down",
}
FUSED_UP = "gate_up"     # ffn_up of families that store gate and up as one matrix (phi3): rows gate | up
NORM_ROLES = frozenset({"final_norm", "attn_norm", "q_norm", "k_norm", "attn_post_norm", "ffn_norm",
                        "ffn_post_norm"})
CHUNK_ELEMENTS = 1 << 24        # float32 elements widened at a time (64 MiB)

Key = tuple[str, "int | None"]  # (role, layer); layer None for model-level tensors


@dataclass
class Weights:
    """Role-addressed, memory-mapped access to a checkpoint's tensors."""

    ckpt: Checkpoint
    spec: ModelSpec
    names: dict[Key, str]       # (role, layer) -> checkpoint tensor name

    @classmethod
    def open(cls, ckpt: Checkpoint, arch: Architecture, ctx: Context) -> "Weights":
        """Index ``ckpt`` by role. The GGUF planner validates names, dtypes and shapes (one set of rules).

        Raises:
            CheckpointError: unknown or missing tensors, non-float dtypes, shapes config.json contradicts.
        """
        plans, _ = plan_tensors(ckpt, arch, ctx, OUTPUT_TYPES["F32"])
        index = name_index(arch, ctx.spec)
        names: dict[Key, str] = {}
        for plan in plans:
            if plan.source is None:          # generated for llama.cpp (rope factors): the graph computes its own
                continue
            row, layer = index[normalize_name(plan.source)]
            role = ROLES.get(row.key)
            if role is None:
                raise CheckpointError(path=str(ckpt.path), problem=f"tensor {plan.source!r} ({row.key.name}) has "
                                                                   "no place in the ONNX decoder graph")
            if role == "up" and ctx.spec.fused_gate_up:
                role = FUSED_UP
            names[(role + ("_bias" if plan.source.endswith(".bias") else ""), layer)] = plan.source
        return cls(ckpt, ctx.spec, names)

    def has(self, role: str, layer: int | None = None) -> bool:
        return (role, layer) in self.names

    def shape(self, role: str, layer: int | None = None) -> tuple[int, ...]:
        return tuple(self.ckpt.info(self.names[(role, layer)]).shape)

    def rows(self, role: str, layer: int | None, start: int, stop: int, cols: slice = slice(None)) -> np.ndarray:
        """float32 copy of rows [start, stop) (and ``cols``) of a tensor; refuses NaN/Inf."""
        name = self.names[(role, layer)]
        raw = self.ckpt.raw(name)[start:stop]
        raw = raw[:, cols] if raw.ndim == 2 else raw
        values = working_array(raw, self.ckpt.info(name).dtype).astype(np.float32)
        if (bad := first_bad_value(values)) is not None:
            raise CheckpointError(path=str(self.ckpt.path), problem=f"tensor {name!r} contains {bad} values; the "
                                                                    "checkpoint is corrupt or was saved after a "
                                                                    "diverged run")
        return values

    def full(self, role: str, layer: int | None = None) -> np.ndarray:
        """The whole tensor in float32; norm weights include the family's offset (Gemma: 1 + w)."""
        values = self.rows(role, layer, 0, self.shape(role, layer)[0])
        if role in NORM_ROLES and self.spec.norm_weight_offset:
            values = values + np.float32(self.spec.norm_weight_offset)
        return values

    def release(self, role: str, layer: int | None = None) -> None:
        if (role, layer) in self.names:
            self.ckpt.release(self.names[(role, layer)])


def rows_per_chunk(n_cols: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows of ``n_cols`` float32 values that fit ``elements``."""
    return max(1, elements // max(n_cols, 1))
