"""Qwen 3 (dense): HF ``Qwen3ForCausalLM`` -> GGUF ``qwen3``.

Facts from llama.cpp's conversion/qwen.py (Qwen3Model, a Qwen2Model subclass): no Q/K/V biases by
default (``attention_bias``), RMSNorm on each Q and K head (``q_norm``/``k_norm``, length head_dim),
an explicit ``head_dim`` that need not equal hidden_size / heads. Metadata and vocabulary as qwen2.
"""

from __future__ import annotations

from typing import Any

import gguf

from edgellm.converters.archs import qwen2
from edgellm.converters.archs.common import (
    Architecture, K, TensorRow, down_shape, embd_shape, has_qkv_bias, head_norm_shape, kv_bias_shape, kv_shape,
    norm_shape, o_shape, q_bias_shape, q_shape, untied, up_shape,
)
from edgellm.converters.spec import Traits

TENSORS = (
    TensorRow("model.embed_tokens.weight", K.TOKEN_EMBD, embd_shape),
    TensorRow("model.norm.weight", K.OUTPUT_NORM, norm_shape),
    TensorRow("lm_head.weight", K.OUTPUT, embd_shape, required=untied),   # absent in tied checkpoints (0.6B)
    TensorRow("model.layers.{bid}.input_layernorm.weight", K.ATTN_NORM, norm_shape),
    TensorRow("model.layers.{bid}.self_attn.q_proj.weight", K.ATTN_Q, q_shape),
    TensorRow("model.layers.{bid}.self_attn.k_proj.weight", K.ATTN_K, kv_shape),
    TensorRow("model.layers.{bid}.self_attn.v_proj.weight", K.ATTN_V, kv_shape),
    TensorRow("model.layers.{bid}.self_attn.q_proj.bias", K.ATTN_Q, q_bias_shape, required=has_qkv_bias),
    TensorRow("model.layers.{bid}.self_attn.k_proj.bias", K.ATTN_K, kv_bias_shape, required=has_qkv_bias),
    TensorRow("model.layers.{bid}.self_attn.v_proj.bias", K.ATTN_V, kv_bias_shape, required=has_qkv_bias),
    TensorRow("model.layers.{bid}.self_attn.q_norm.weight", K.ATTN_Q_NORM, head_norm_shape),
    TensorRow("model.layers.{bid}.self_attn.k_norm.weight", K.ATTN_K_NORM, head_norm_shape),
    TensorRow("model.layers.{bid}.self_attn.o_proj.weight", K.ATTN_OUT, o_shape),
    TensorRow("model.layers.{bid}.post_attention_layernorm.weight", K.FFN_NORM, norm_shape),
    TensorRow("model.layers.{bid}.mlp.gate_proj.weight", K.FFN_GATE, up_shape),
    TensorRow("model.layers.{bid}.mlp.up_proj.weight", K.FFN_UP, up_shape),
    TensorRow("model.layers.{bid}.mlp.down_proj.weight", K.FFN_DOWN, down_shape),
)

# transformers Qwen3Config defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "attention_bias": False, "use_sliding_window": False,
}

ARCH = Architecture(
    name="qwen3", gguf_arch=gguf.MODEL_ARCH.QWEN3, hf_architectures=("Qwen3ForCausalLM",),
    traits=Traits(qk_norm=True, qkv_bias=None), defaults=DEFAULTS, tensors=TENSORS, metadata=qwen2.metadata,
    vocab=qwen2.vocab,
)
