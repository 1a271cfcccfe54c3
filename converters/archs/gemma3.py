"""Gemma 3 text models: HF ``Gemma3ForCausalLM`` (model_type gemma3_text) and the text half of
``Gemma3ForConditionalGeneration`` (model_type gemma3, config under ``text_config``, tensors under
``language_model.``) -> GGUF ``gemma3``.

Facts from llama.cpp's conversion/gemma.py (Gemma3Model): every ``*norm.weight`` gets +1 (Gemma3RMSNorm
computes x * (1 + w), llama.cpp's RMSNorm x * w), including the per-head q_norm/k_norm; four norms per
block (pre/post attention, pre/post feed-forward); token_embd rows beyond the tokenizer are dropped when
the vocabulary comes from tokenizer.json; sliding-window layers use their own rope theta.
"""

from __future__ import annotations

from typing import Any, Mapping

import gguf
import numpy as np

from edgellm.converters.archs.common import (
    Architecture, Context, K, TensorRow, base_metadata, down_shape, embd_shape, head_norm_shape,
    kv_shape, norm_shape, o_shape, override, q_shape, up_shape,
)
from edgellm.converters.spec import FULL, ModelSpec, Traits, rope_parameters
from edgellm.converters.tokenizer import TokenizerFiles, bpe_vocab, spm_added_tokens, spm_pieces, spm_vocab

NORM_OFFSET = 1.0   # Gemma3RMSNorm: output * (1.0 + weight)


def add_norm_offset(w: np.ndarray, ctx: Context) -> np.ndarray:
    """w + 1 in the array's own dtype (f16 stays f16, as in llama.cpp's torch code)."""
    return w + w.dtype.type(NORM_OFFSET)


def tokenizer_rows(ctx: Context) -> int | None:
    """Rows llama.cpp keeps in token_embd: tokenizer.json vocab + added tokens (None: keep all).

    Only for tokenizer.json vocabularies: with tokenizer.model the GGUF vocabulary is padded to vocab_size.
    """
    tj = ctx.tokenizer.tokenizer_json if ctx.tokenizer else None
    if ctx.tokenizer is None or ctx.tokenizer.spm_model is not None or tj is None:
        return None
    return len(tj["model"]["vocab"]) + len(tj.get("added_tokens", []))


def _norm(hf: str, key: gguf.MODEL_TENSOR, shape=norm_shape) -> TensorRow:
    return TensorRow(hf, key, shape, add_norm_offset)


TENSORS = (
    TensorRow("model.embed_tokens.weight", K.TOKEN_EMBD, embd_shape, keep_rows=tokenizer_rows),
    _norm("model.norm.weight", K.OUTPUT_NORM),
    # Gemma 3 ties the output to token_embd; a stray lm_head (e.g. from AutoAWQ) would become "output"
    TensorRow("lm_head.weight", K.OUTPUT, embd_shape, required=lambda spec: False),
    _norm("model.layers.{bid}.input_layernorm.weight", K.ATTN_NORM),
    TensorRow("model.layers.{bid}.self_attn.q_proj.weight", K.ATTN_Q, q_shape),
    TensorRow("model.layers.{bid}.self_attn.k_proj.weight", K.ATTN_K, kv_shape),
    TensorRow("model.layers.{bid}.self_attn.v_proj.weight", K.ATTN_V, kv_shape),
    _norm("model.layers.{bid}.self_attn.q_norm.weight", K.ATTN_Q_NORM, head_norm_shape),
    _norm("model.layers.{bid}.self_attn.k_norm.weight", K.ATTN_K_NORM, head_norm_shape),
    TensorRow("model.layers.{bid}.self_attn.o_proj.weight", K.ATTN_OUT, o_shape),
    _norm("model.layers.{bid}.post_attention_layernorm.weight", K.ATTN_POST_NORM),   # llama's is FFN_NORM
    _norm("model.layers.{bid}.pre_feedforward_layernorm.weight", K.FFN_PRE_NORM),
    _norm("model.layers.{bid}.post_feedforward_layernorm.weight", K.FFN_POST_NORM),
    TensorRow("model.layers.{bid}.mlp.gate_proj.weight", K.FFN_GATE, up_shape),
    TensorRow("model.layers.{bid}.mlp.up_proj.weight", K.FFN_UP, up_shape),
    TensorRow("model.layers.{bid}.mlp.down_proj.weight", K.FFN_DOWN, down_shape),
)

# transformers Gemma3TextConfig defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "tie_word_embeddings": True,
}
SWA_PATTERN = 6   # every 6th layer attends globally (llama.cpp's default for gemma3 as well)


def metadata(hp: Mapping[str, Any], spec: ModelSpec, ftype: int) -> list[tuple]:
    """Gemma3Model.set_gguf_parameters: shared hyperparameters, then gemma3's own values on top."""
    rope = rope_parameters(hp)
    updates = [
        ("add_context_length", hp.get("max_position_embeddings", 131072)),
        ("add_head_count", hp.get("num_attention_heads", 8)),
        ("add_layer_norm_rms_eps", hp.get("rms_norm_eps", 1e-6)),
        ("add_key_length", hp.get("head_dim", 256)),
        ("add_value_length", hp.get("head_dim", 256)),
        ("add_rope_freq_base", rope.get(FULL, rope).get("rope_theta", 1_000_000.0)),
    ]
    if hp.get("final_logit_softcapping"):
        updates.append(("add_final_logit_softcapping", hp["final_logit_softcapping"]))
    if hp.get("sliding_window_pattern") != 1:
        updates.append(("add_sliding_window", hp["sliding_window"]))
    updates.append(("add_head_count_kv", hp.get("num_key_value_heads", 4)))
    return override(base_metadata(hp, spec, ftype), updates)


def vocab(files: TokenizerFiles, hp: Mapping[str, Any], spec: ModelSpec) -> list[tuple]:
    """SentencePiece (Gemma's tokenizer.model) without a leading space, else byte-level BPE."""
    if files.spm_model is not None:
        table = spm_added_tokens(spm_pieces(files, spec.vocab_size), files)
        return spm_vocab(table, files).calls() + [("add_add_space_prefix", False)]
    return bpe_vocab(files, hp.get("vocab_size")).calls()


ARCH = Architecture(
    name="gemma3", gguf_arch=gguf.MODEL_ARCH.GEMMA3,
    hf_architectures=("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
    traits=Traits(qk_norm=True, norm_weight_offset=NORM_OFFSET, sqrt_embedding_scale=True,
                  default_swa_pattern=SWA_PATTERN),
    defaults=DEFAULTS, tensors=TENSORS, metadata=metadata, vocab=vocab,
)
