"""Qwen 1.5 / 2 / 2.5: HF ``Qwen2ForCausalLM`` -> GGUF ``qwen2``.

Facts from llama.cpp's conversion/qwen.py (Qwen2Model): the LLaMA layout without the Q/K permutation
(llama.cpp's qwen2 graph uses NeoX-style rope, which matches HF's rotate-half layout), with biases on
Q, K and V; vocabulary from tokenizer.model if present, else byte-level BPE (pre-tokenizer "qwen2").
"""

from __future__ import annotations

from typing import Any, Mapping

import gguf

from edgellm.converters.archs.common import (
    Architecture, K, TensorRow, base_metadata, down_shape, embd_shape, kv_bias_shape, kv_shape, norm_shape,
    o_shape, q_bias_shape, q_shape, untied, up_shape,
)
from edgellm.converters.spec import ModelSpec, Traits
from edgellm.converters.tokenizer import TokenizerFiles, bpe_vocab, spm_added_tokens, spm_pieces, spm_vocab

TENSORS = (
    TensorRow("model.embed_tokens.weight", K.TOKEN_EMBD, embd_shape),
    TensorRow("model.norm.weight", K.OUTPUT_NORM, norm_shape),
    TensorRow("lm_head.weight", K.OUTPUT, embd_shape, required=untied),   # absent in tied checkpoints (0.5B)
    TensorRow("model.layers.{bid}.input_layernorm.weight", K.ATTN_NORM, norm_shape),
    TensorRow("model.layers.{bid}.self_attn.q_proj.weight", K.ATTN_Q, q_shape),
    TensorRow("model.layers.{bid}.self_attn.q_proj.bias", K.ATTN_Q, q_bias_shape),
    TensorRow("model.layers.{bid}.self_attn.k_proj.weight", K.ATTN_K, kv_shape),
    TensorRow("model.layers.{bid}.self_attn.k_proj.bias", K.ATTN_K, kv_bias_shape),
    TensorRow("model.layers.{bid}.self_attn.v_proj.weight", K.ATTN_V, kv_shape),
    TensorRow("model.layers.{bid}.self_attn.v_proj.bias", K.ATTN_V, kv_bias_shape),
    TensorRow("model.layers.{bid}.self_attn.o_proj.weight", K.ATTN_OUT, o_shape),
    TensorRow("model.layers.{bid}.post_attention_layernorm.weight", K.FFN_NORM, norm_shape),
    TensorRow("model.layers.{bid}.mlp.gate_proj.weight", K.FFN_GATE, up_shape),
    TensorRow("model.layers.{bid}.mlp.up_proj.weight", K.FFN_UP, up_shape),
    TensorRow("model.layers.{bid}.mlp.down_proj.weight", K.FFN_DOWN, down_shape),
)

# transformers Qwen2Config defaults (no head_dim attribute: llama.cpp writes no key_length for qwen2)
DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "use_sliding_window": False,
}


def metadata(hp: Mapping[str, Any], spec: ModelSpec, ftype: int) -> list[tuple]:
    """Qwen2Model.set_gguf_parameters: the shared hyperparameters (pooling only for embedding models)."""
    return base_metadata(hp, spec, ftype)


def vocab(files: TokenizerFiles, hp: Mapping[str, Any], spec: ModelSpec) -> list[tuple]:
    if files.spm_model is not None:
        return spm_vocab(spm_added_tokens(spm_pieces(files, spec.vocab_size), files), files).calls()
    return bpe_vocab(files, hp.get("vocab_size")).calls()


ARCH = Architecture(
    name="qwen2", gguf_arch=gguf.MODEL_ARCH.QWEN2, hf_architectures=("Qwen2ForCausalLM",),
    traits=Traits(qkv_bias=True), defaults=DEFAULTS, tensors=TENSORS, metadata=metadata, vocab=vocab,
)
