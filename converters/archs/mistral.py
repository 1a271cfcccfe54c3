"""Mistral (7B v0.1-v0.3, Nemo-style HF checkpoints): HF ``MistralForCausalLM`` -> GGUF ``llama``.

llama.cpp converts MistralForCausalLM with its LlamaModel class: same tensor table, Q/K permutation,
metadata and vocabulary as llama.py. Only the transformers config defaults differ (grouped-query heads,
a 4096-token sliding window, 128k positions). llama.cpp's ``llama`` graph ignores the sliding window.
"""

from __future__ import annotations

from typing import Any

import gguf

from edgellm.converters.archs import llama
from edgellm.converters.archs.common import Architecture
from edgellm.converters.spec import Traits

# transformers MistralConfig defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": lambda hp: hp["hidden_size"] // hp["num_attention_heads"],
    "hidden_act": "silu", "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "sliding_window": 4096, "tie_word_embeddings": False,
}

ARCH = Architecture(
    name="mistral", gguf_arch=gguf.MODEL_ARCH.LLAMA, hf_architectures=("MistralForCausalLM",),
    traits=Traits(qkv_bias=False), defaults=DEFAULTS, tensors=llama.TENSORS, metadata=llama.metadata,
    vocab=llama.vocab, extra_tensors=llama.extra_tensors,
)
