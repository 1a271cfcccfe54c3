"""Phi-3 / Phi-3.5 mini and Phi-4-mini: HF ``Phi3ForCausalLM`` -> GGUF ``phi3``.

Facts from llama.cpp's conversion/phi.py (Phi3MiniModel): the fused ``qkv_proj`` and ``gate_up_proj``
are kept fused (llama.cpp splits them at run time: attn_qkv rows are Q, then K, then V; ffn_up rows are
gate, then up); rope dimensions are ``partial_rotary_factor * hidden / heads``; LongRoPE checkpoints
carry their per-dimension long/short factors as ``rope_factors_long``/``rope_factors_short`` tensors;
``sliding_window`` is always written (0 when absent, which marks Phi-4). The SentencePiece vocabulary
takes added tokens from tokenizer_config.json and tokenizer.json, typed only by their ``special`` flag.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import gguf
import numpy as np

from edgellm.converters.archs.common import Architecture, K, TensorRow, down_shape, embd_shape, norm_shape, \
    o_shape, untied
from edgellm.converters.spec import FULL, ModelSpec, Traits, find, rope_parameters
from edgellm.converters.tokenizer import TokenizerFiles, bpe_vocab, spm_added_tokens_phi3, spm_pieces, spm_vocab


def qkv_shape(s: ModelSpec) -> tuple[int, ...]:
    return ((s.n_head + 2 * s.n_kv_head) * s.head_dim, s.n_embd)


def gate_up_shape(s: ModelSpec) -> tuple[int, ...]:
    return (2 * s.n_ff, s.n_embd)


TENSORS = (
    TensorRow("model.embed_tokens.weight", K.TOKEN_EMBD, embd_shape),
    TensorRow("model.norm.weight", K.OUTPUT_NORM, norm_shape),
    TensorRow("lm_head.weight", K.OUTPUT, embd_shape, required=untied),   # Phi-4-mini ties it
    TensorRow("model.layers.{bid}.input_layernorm.weight", K.ATTN_NORM, norm_shape),
    TensorRow("model.layers.{bid}.self_attn.qkv_proj.weight", K.ATTN_QKV, qkv_shape),   # rows: Q | K | V
    TensorRow("model.layers.{bid}.self_attn.o_proj.weight", K.ATTN_OUT, o_shape),
    TensorRow("model.layers.{bid}.post_attention_layernorm.weight", K.FFN_NORM, norm_shape),
    TensorRow("model.layers.{bid}.mlp.gate_up_proj.weight", K.FFN_UP, gate_up_shape),    # rows: gate | up
    TensorRow("model.layers.{bid}.mlp.down_proj.weight", K.FFN_DOWN, down_shape),
)

# transformers Phi3Config defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": lambda hp: hp["num_attention_heads"], "hidden_act": "silu",
    "max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "partial_rotary_factor": 1.0, "tie_word_embeddings": False,
}


def rope_dims(hp: Mapping[str, Any]) -> int:
    rope = rope_parameters(hp)
    return int(rope.get("partial_rotary_factor", 1.0) * find(hp, "n_embd")) // find(hp, "n_head")


def metadata(hp: Mapping[str, Any], spec: ModelSpec, ftype: int) -> list[tuple]:
    """Phi3MiniModel.set_gguf_parameters (its own list, not the shared one)."""
    rope = rope_parameters(hp)
    calls = [
        ("add_context_length", hp.get("n_positions") or hp["max_position_embeddings"]),
        ("add_rope_scaling_orig_ctx_len", rope["original_max_position_embeddings"]),
        ("add_embedding_length", find(hp, "n_embd")), ("add_feed_forward_length", hp["intermediate_size"]),
        ("add_block_count", spec.n_layers), ("add_head_count", find(hp, "n_head")),
        ("add_head_count_kv", find(hp, "n_kv_head")), ("add_layer_norm_rms_eps", hp["rms_norm_eps"]),
        ("add_rope_dimension_count", rope_dims(hp)), ("add_rope_freq_base", rope.get(FULL, rope)["rope_theta"]),
        ("add_file_type", ftype), ("add_sliding_window", hp.get("sliding_window") or 0),
    ]
    return calls


def early_metadata(hp: Mapping[str, Any], spec: ModelSpec) -> list[tuple]:
    """The LongRoPE attention factor, which llama.cpp writes along with the rope factor tensors."""
    factor = longrope_attn_factor(hp)
    return [] if factor is None else [("add_rope_scaling_attn_factors", factor)]


def longrope_attn_factor(hp: Mapping[str, Any]) -> float | None:
    """Attention scale of LongRoPE/YaRN long-context checkpoints (None without long factors).

    Raises ValueError for an unknown scaling type, as llama.cpp does.
    """
    rope = rope_parameters(hp)
    if not rope.get("long_factor"):
        return None
    scale = (hp.get("n_positions") or hp["max_position_embeddings"]) / rope["original_max_position_embeddings"]
    kind = str(rope.get("rope_type", "")).lower()
    if kind in ("su", "longrope"):
        return math.sqrt(1 + math.log(scale) / math.log(rope["original_max_position_embeddings"])) \
            if scale > 1.0 else 1.0
    if kind == "yarn":
        return 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    raise ValueError(f"phi3 rope scaling type {kind!r} is not supported")


def extra_tensors(hp: Mapping[str, Any], spec: ModelSpec) -> list[tuple[str, np.ndarray]]:
    """rope_factors_long/short for LongRoPE checkpoints (128k context variants)."""
    rope = rope_parameters(hp)
    long, short = rope.get("long_factor"), rope.get("short_factor")
    if not long:
        return []
    if short is None or len(long) != len(short) or len(long) != rope_dims(hp) / 2:
        raise ValueError(f"rope long/short factors must each have {rope_dims(hp) // 2} values")
    return [(gguf.TENSOR_NAMES[K.ROPE_FACTORS_LONG] + ".weight", np.array(long, dtype=np.float32)),
            (gguf.TENSOR_NAMES[K.ROPE_FACTORS_SHORT] + ".weight", np.array(short, dtype=np.float32))]


def vocab(files: TokenizerFiles, hp: Mapping[str, Any], spec: ModelSpec) -> list[tuple]:
    """Phi-4-mini ships a GPT-2 BPE tokenizer; Phi-3 a SentencePiece one."""
    if (files.tokenizer_config or {}).get("tokenizer_class") == "GPT2Tokenizer":
        return bpe_vocab(files, hp.get("vocab_size")).calls()
    table = spm_added_tokens_phi3(spm_pieces(files, spec.vocab_size), files)
    return spm_vocab(table, files).calls()


ARCH = Architecture(
    name="phi3", gguf_arch=gguf.MODEL_ARCH.PHI3, hf_architectures=("Phi3ForCausalLM",),
    traits=Traits(fused_qkv=True, fused_gate_up=True), defaults=DEFAULTS, tensors=TENSORS, metadata=metadata,
    vocab=vocab, extra_tensors=extra_tensors, early_metadata=early_metadata,
)
