"""The pieces every architecture module fills in: tensor rows, the ``Architecture`` record, shared metadata.

An architecture module is data: a tuple of ``TensorRow`` (one per HF tensor: its name pattern, the GGUF
tensor it becomes, the shape config.json implies, an optional pure transform), the transformers config
defaults, and small functions for metadata, vocabulary and generated tensors. Metadata is returned as a
list of GGUFWriter calls ``(method, *args)`` so it can be inspected and tested without writing a file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import gguf
import numpy as np

from edgellm.converters.spec import FULL, SLIDING, ModelSpec, Traits, find, rope_parameters
from edgellm.converters.tokenizer import TokenizerFiles

K = gguf.MODEL_TENSOR
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Context:
    """What a transform may look at besides the tensor: the spec and the tokenizer files."""

    spec: ModelSpec
    hparams: Mapping[str, Any]
    tokenizer: TokenizerFiles | None = None


Transform = Callable[[np.ndarray, Context], np.ndarray]


@dataclass(frozen=True)
class TensorRow:
    """One HF tensor and the GGUF tensor it becomes."""

    hf: str                                     # HF name; "{bid}" stands for the layer index
    key: gguf.MODEL_TENSOR                      # GGUF tensor kind (its name comes from gguf.TENSOR_NAMES)
    shape: Callable[[ModelSpec], Shape]         # HF (PyTorch) shape config.json implies
    transform: Transform | None = None          # pure function applied to the (f16 or f32) array
    required: Callable[[ModelSpec], bool] = lambda spec: True
    keep_rows: Callable[[Context], int | None] | None = None   # convert only the first N rows (None: all)

    def out_shape(self, shape: Shape, ctx: Context) -> Shape:
        """The GGUF tensor's shape (PyTorch order) for a checkpoint tensor of ``shape``."""
        rows = self.keep_rows(ctx) if self.keep_rows else None
        return shape if rows is None else (min(rows, shape[0]), *shape[1:])

    @property
    def per_layer(self) -> bool:
        return "{bid}" in self.hf

    def gguf_name(self, bid: int | None) -> str:
        suffix = ".bias" if self.hf.endswith(".bias") else ".weight"
        return gguf.TENSOR_NAMES[self.key].format(bid=bid) + suffix


def _no_extra(hp: Mapping[str, Any], spec: ModelSpec) -> list[tuple[str, np.ndarray]]:
    return []


@dataclass(frozen=True)
class Architecture:
    """Everything the converter needs to know about one HF ``model_type``."""

    name: str                                   # registry key, equal to the module name
    gguf_arch: gguf.MODEL_ARCH
    hf_architectures: tuple[str, ...]           # config.json "architectures" llama.cpp handles with this class
    traits: Traits
    defaults: Mapping[str, Any]                 # transformers config class defaults (value or f(hparams))
    tensors: tuple[TensorRow, ...]
    metadata: Callable[[Mapping[str, Any], ModelSpec, int], list[tuple]]   # (hparams, spec, file type) -> calls
    vocab: Callable[[TokenizerFiles, Mapping[str, Any], ModelSpec], list[tuple]]   # tokenizer.* writer calls
    extra_tensors: Callable[[Mapping[str, Any], ModelSpec], list[tuple[str, np.ndarray]]] = _no_extra
    # metadata llama.cpp writes while generating those tensors, i.e. before general.type
    early_metadata: Callable[[Mapping[str, Any], ModelSpec], list[tuple]] = lambda hp, spec: []
    skip: tuple[str, ...] = field(default_factory=tuple)   # regexes of HF tensors that are not converted

    @property
    def gguf_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


# HF tensors no text converter keeps (llama.cpp TextModel.filter_tensors and prepare_tensors): vision and
# audio towers of multimodal wrappers, projectors, and buffers that are recomputed at run time.
COMMON_SKIP = (
    r"^(mlp|vit\.|vpm\.|siglip2\.|conformer\.|merger\.|resampler\.|sound_encoder\.|sound_projection\.)",
    r"visual\.|vision\.|audio\.|talker\.|vision_|audio_|token2wav\.|code2wav\.|projector\.|pre_mm_projector_norm",
    r"image_newline|view_seperator|patch_embed|patch_embedding|patch_merger\.|patch_merge_mlp\.|model\.connector\.",
    r"(\.attention\.masked_bias|\.attention\.bias|\.rotary_emb\.inv_freq)$",
)


def normalize_name(name: str) -> str:
    """HF name as llama.cpp maps it: multimodal wrappers' ``language_model.`` prefix dropped."""
    if name.endswith("e_score_correction_bias"):
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
    return name.replace("language_model.", "")


def is_skipped(name: str, arch: Architecture) -> bool:
    return any(re.search(pattern, name) for pattern in COMMON_SKIP + arch.skip)


# ------------------------------------------------------------------ shapes (HF order: out_features, in_features)

def embd_shape(s: ModelSpec) -> Shape:
    return (s.vocab_size, s.n_embd)


def norm_shape(s: ModelSpec) -> Shape:
    return (s.n_embd,)


def head_norm_shape(s: ModelSpec) -> Shape:
    return (s.head_dim,)


def q_shape(s: ModelSpec) -> Shape:
    return (s.n_head * s.head_dim, s.n_embd)


def kv_shape(s: ModelSpec) -> Shape:
    return (s.n_kv_head * s.head_dim, s.n_embd)


def q_bias_shape(s: ModelSpec) -> Shape:
    return (s.n_head * s.head_dim,)


def kv_bias_shape(s: ModelSpec) -> Shape:
    return (s.n_kv_head * s.head_dim,)


def o_shape(s: ModelSpec) -> Shape:
    return (s.n_embd, s.n_head * s.head_dim)


def up_shape(s: ModelSpec) -> Shape:
    return (s.n_ff, s.n_embd)


def down_shape(s: ModelSpec) -> Shape:
    return (s.n_embd, s.n_ff)


def untied(s: ModelSpec) -> bool:
    return not s.tie_embeddings


def has_qkv_bias(s: ModelSpec) -> bool:
    return s.qkv_bias


# ------------------------------------------------------------------ metadata shared by most families

def base_metadata(hp: Mapping[str, Any], spec: ModelSpec, ftype: int) -> list[tuple]:
    """The hyperparameters llama.cpp's ``TextModel.set_gguf_parameters`` writes, in its order."""
    calls: list[tuple] = [("add_block_count", spec.n_layers)]
    optional = (("add_context_length", find(hp, "context_length")), ("add_embedding_length", find(hp, "n_embd")),
                ("add_feed_forward_length", _ff_length(hp)), ("add_head_count", find(hp, "n_head")),
                ("add_head_count_kv", find(hp, "n_kv_head")))
    calls += [(method, value) for method, value in optional if value is not None]
    if hp.get("is_causal") is False:
        calls.append(("add_causal_attention", False))
    rope = rope_parameters(hp)
    full = rope.get(FULL, rope)
    calls += rope_scaling_metadata(full)
    if full.get("rope_theta") is not None:
        calls.append(("add_rope_freq_base", full["rope_theta"]))
    if (local := rope.get(SLIDING, {}).get("rope_theta")) is not None:
        calls.append(("add_rope_freq_base_swa", local))
    for method, keys in (("add_layer_norm_rms_eps", ("rms_norm_eps", "norm_eps")),
                         ("add_layer_norm_eps", ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"))):
        if (value := next((hp[k] for k in keys if hp.get(k) is not None), None)) is not None:
            calls.append((method, value))
    if hp.get("head_dim") is not None:
        calls += [("add_key_length", hp["head_dim"]), ("add_value_length", hp["head_dim"])]
    calls.append(("add_file_type", ftype))
    return calls


def _ff_length(hp: Mapping[str, Any]) -> Any:
    keys = ("prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size", "n_inner", "hidden_dim")
    return next((hp[k] for k in keys if hp.get(k) is not None), None)


# rope_type -> GGUF rope scaling calls; llama3 scaling becomes a rope_freqs tensor instead (llama.py)
def rope_scaling_metadata(full: Mapping[str, Any]) -> list[tuple]:
    kind, factor = full.get("rope_type"), full.get("factor")
    if kind == "linear" and factor is not None:
        return [("add_rope_scaling_type", gguf.RopeScalingType.LINEAR), ("add_rope_scaling_factor", factor)]
    if kind == "yarn" and factor is not None:
        calls = [("add_rope_scaling_type", gguf.RopeScalingType.YARN), ("add_rope_scaling_factor", factor),
                 ("add_rope_scaling_orig_ctx_len", full["original_max_position_embeddings"])]
        optional = (("add_rope_scaling_yarn_ext_factor", full.get("extrapolation_factor")),
                    ("add_rope_scaling_yarn_attn_factor", full.get("attention_factor", full.get("attn_factor"))),
                    ("add_rope_scaling_yarn_beta_fast", full.get("beta_fast")),
                    ("add_rope_scaling_yarn_beta_slow", full.get("beta_slow")))
        return calls + [(m, v) for m, v in optional if v is not None]
    if kind in ("su", "longrope"):
        return [("add_rope_scaling_type", gguf.RopeScalingType.LONGROPE)]
    return []


def override(calls: list[tuple], updates: list[tuple]) -> list[tuple]:
    """``calls`` with ``updates`` applied: a call to the same writer method replaces the earlier one in place
    (GGUF keys keep their first position, as when llama.cpp sets a key twice); new methods are appended."""
    out = list(calls)
    for update in updates:
        index = next((i for i, call in enumerate(out) if _call_key(call) == _call_key(update)), None)
        if index is None:
            out.append(update)
        else:
            out[index] = update
    return out


def _call_key(call: tuple) -> tuple:
    # generic add_bool/add_uint32(key, value) calls are identified by their key, named ones by the method
    return call[:2] if call[0].startswith("add_") and call[0][4:] in _GENERIC else call[:1]


_GENERIC = {"bool", "uint32", "int32", "float32", "string", "array", "uint64"}
