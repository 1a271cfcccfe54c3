"""LLaMA (1/2/3.x) and the families that reuse its layout: HF ``LlamaForCausalLM`` -> GGUF ``llama``.

Facts from llama.cpp's conversion/llama.py (LlamaModel): Q and K are permuted from HF's rotate-half
layout back to the interleaved (GPT-J) layout llama.cpp's rope expects; Llama 3.1 "llama3" rope scaling
is stored as a ``rope_freqs`` tensor of per-dimension factors; the vocabulary is SentencePiece when
tokenizer.model exists, else byte-level BPE from tokenizer.json.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import gguf
import numpy as np

from edgellm.converters.archs.common import (
    Architecture, Context, K, TensorRow, base_metadata, down_shape, embd_shape, has_qkv_bias, kv_bias_shape,
    kv_shape, norm_shape, o_shape, q_bias_shape, q_shape, untied, up_shape,
)
from edgellm.converters.spec import FULL, ModelSpec, Traits, rope_parameters
from edgellm.converters.tokenizer import TokenizerFiles, bpe_vocab, spm_added_tokens, spm_pieces, spm_vocab

# llama3 rope scaling defaults (transformers' _compute_llama3_parameters, as llama.cpp reads them)
LLAMA3_ROPE_DEFAULTS = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> interleaved pairs per head: (n_head, 2, d/2, ...) -> (n_head, d/2, 2, ...)."""
    rows = weights.shape[0]
    return (weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def permute_q(w: np.ndarray, ctx: Context) -> np.ndarray:
    return permute(w, ctx.spec.n_head)


def permute_k(w: np.ndarray, ctx: Context) -> np.ndarray:
    return permute(w, ctx.spec.n_kv_head)


TENSORS = (
    TensorRow("model.embed_tokens.weight", K.TOKEN_EMBD, embd_shape),
    TensorRow("model.norm.weight", K.OUTPUT_NORM, norm_shape),
    TensorRow("lm_head.weight", K.OUTPUT, embd_shape, required=untied),   # absent when tie_word_embeddings
    TensorRow("model.layers.{bid}.input_layernorm.weight", K.ATTN_NORM, norm_shape),
    TensorRow("model.layers.{bid}.self_attn.q_proj.weight", K.ATTN_Q, q_shape, permute_q),
    TensorRow("model.layers.{bid}.self_attn.k_proj.weight", K.ATTN_K, kv_shape, permute_k),
    TensorRow("model.layers.{bid}.self_attn.v_proj.weight", K.ATTN_V, kv_shape),
    TensorRow("model.layers.{bid}.self_attn.o_proj.weight", K.ATTN_OUT, o_shape),
    # biases only with attention_bias=true (e.g. some InternLM / Llama-architecture finetunes)
    TensorRow("model.layers.{bid}.self_attn.q_proj.bias", K.ATTN_Q, q_bias_shape, permute_q, required=has_qkv_bias),
    TensorRow("model.layers.{bid}.self_attn.k_proj.bias", K.ATTN_K, kv_bias_shape, permute_k, required=has_qkv_bias),
    TensorRow("model.layers.{bid}.self_attn.v_proj.bias", K.ATTN_V, kv_bias_shape, required=has_qkv_bias),
    TensorRow("model.layers.{bid}.self_attn.o_proj.bias", K.ATTN_OUT, norm_shape, required=has_qkv_bias),
    TensorRow("model.layers.{bid}.post_attention_layernorm.weight", K.FFN_NORM, norm_shape),
    TensorRow("model.layers.{bid}.mlp.gate_proj.weight", K.FFN_GATE, up_shape),
    TensorRow("model.layers.{bid}.mlp.up_proj.weight", K.FFN_UP, up_shape),
    TensorRow("model.layers.{bid}.mlp.down_proj.weight", K.FFN_DOWN, down_shape),
)

# transformers LlamaConfig defaults (what llama.cpp sees through AutoConfig when config.json omits a key)
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": lambda hp: hp["num_attention_heads"],
    "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
    "head_dim": lambda hp: hp["hidden_size"] // hp["num_attention_heads"],
}


def metadata(hp: Mapping[str, Any], spec: ModelSpec, ftype: int) -> list[tuple]:
    """LlamaModel.set_gguf_parameters: the shared hyperparameters + vocab size + rope dimensions."""
    return base_metadata(hp, spec, ftype) + [("add_vocab_size", hp["vocab_size"]),
                                             ("add_rope_dimension_count", hp.get("head_dim") or
                                              hp["hidden_size"] // hp["num_attention_heads"])]


def vocab(files: TokenizerFiles, hp: Mapping[str, Any], spec: ModelSpec) -> list[tuple]:
    """SentencePiece when tokenizer.model exists, else byte-level BPE (Llama 3); add_prefix_space first."""
    calls: list[tuple] = []
    if (prefix := (files.tokenizer_config or {}).get("add_prefix_space")) is not None:
        calls.append(("add_add_space_prefix", prefix))
    if files.spm_model is not None:
        return calls + spm_vocab(spm_added_tokens(spm_pieces(files, spec.vocab_size), files), files).calls()
    if _is_llama_hf_json(files.tokenizer_json):
        raise files.error("a SentencePiece-style tokenizer.json without tokenizer.model is not supported; "
                          "add the model's tokenizer.model")
    return calls + bpe_vocab(files, hp.get("vocab_size")).calls()


def _is_llama_hf_json(tj: dict | None) -> bool:
    """tokenizer.json of a SentencePiece model exported by transformers (byte_fallback BPE, Sequence decoder)."""
    model = (tj or {}).get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and \
        (tj or {}).get("decoder", {}).get("type") == "Sequence"


def llama3_rope_factors(hp: Mapping[str, Any], spec: ModelSpec) -> np.ndarray | None:
    """Per-dimension frequency divisors of Llama 3.1 rope scaling (None without llama3 scaling).

    Computed in float32 with the operation order of llama.cpp's torch code (torch evaluates
    ``scalar / tensor`` as ``reciprocal(tensor) * scalar``). torch's vectorized powf is not correctly
    rounded, so a few factors may differ from llama.cpp's file in the last bit (we round the exact power).
    """
    rope = rope_parameters(hp)
    params = rope.get(FULL, rope)
    if str(params.get("rope_type", "")).lower() != "llama3":
        return None
    p = {**LLAMA3_ROPE_DEFAULTS, **{k: v for k, v in params.items() if v is not None}}
    f32 = np.float32
    dim = spec.head_dim
    inv = lambda x: f32(1) / x  # noqa: E731  (torch.reciprocal)
    exponents = (np.arange(0, dim, 2, dtype=f32) / f32(dim)).astype(np.float64)
    freqs = inv((np.float64(f32(p.get("rope_theta", 10000.0))) ** exponents).astype(f32))
    old_ctx, low, high, factor = (p["original_max_position_embeddings"], p["low_freq_factor"],
                                  p["high_freq_factor"], p["factor"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high      # Python floats (double), as in llama.cpp
    out = []
    for freq in freqs:
        wavelen = inv(freq) * f32(2 * math.pi)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (inv(wavelen) * f32(old_ctx) - f32(low)) / f32(high - low)
            out.append(inv((f32(1) - smooth) / f32(factor) + smooth))
    return np.array(out, dtype=np.float32)


def extra_tensors(hp: Mapping[str, Any], spec: ModelSpec) -> list[tuple[str, np.ndarray]]:
    factors = llama3_rope_factors(hp, spec)
    return [] if factors is None else [(gguf.TENSOR_NAMES[K.ROPE_FREQS] + ".weight", factors)]


ARCH = Architecture(
    name="llama", gguf_arch=gguf.MODEL_ARCH.LLAMA, hf_architectures=("LlamaForCausalLM", "LLaMAForCausalLM"),
    traits=Traits(qkv_bias=None), defaults=DEFAULTS, tensors=TENSORS, metadata=metadata, vocab=vocab,
    extra_tensors=extra_tensors,
)
