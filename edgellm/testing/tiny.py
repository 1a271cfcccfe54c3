"""Tiny random Hugging Face checkpoints of every supported architecture, written without torch.

``make_checkpoint(variant, out_dir)`` writes what a real checkpoint directory holds: config.json with the
real HF keys of that family, model.safetensors (or shards plus an index), a tokenizer trained in-process,
tokenizer_config.json with a chat template, and generation_config.json. Weights are drawn from
``np.random.default_rng(seed)`` in a fixed order, so the same call writes the same bytes.

Sizes follow STYLE.md (hidden 64, 2 layers, vocab a little over 256 + specials) with grouped-query
attention (4 query heads share 2 or 1 KV heads). Scales are chosen so the logits are not degenerate:
matrices have std 1/sqrt(fan_in), embeddings std 0.4, norm weights 1 +- 0.1 (Gemma stores w for 1 + w).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edgellm import safetensors
from edgellm.testing import tokenizers_tiny

ARCHITECTURES = ("llama", "llama3", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3", "phi3")

DTYPES = {"f32": ("float32", "F32"), "f16": ("float16", "F16"), "bf16": ("bfloat16", "BF16")}  # -> torch_dtype, st

EMBED_STD = 0.4        # embedding / lm_head rows: logits of std ~3 after the final norm (hidden 64)
NORM_NOISE = 0.1       # norm weights are centre + N(0, 0.1)
BIAS_STD = 0.1

# Tensor table: one row per tensor kind. name ("{p}" = text-model prefix, "{i}" = layer), shape in symbols
# (see _dims), how to initialise it, and the feature a checkpoint needs to have it (None: always present).
TENSORS: tuple[tuple[str, tuple[str, ...], str, str | None], ...] = (
    ("{p}embed_tokens.weight", ("V", "H"), "embed", None),
    ("{p}layers.{i}.input_layernorm.weight", ("H",), "norm", None),
    ("{p}layers.{i}.self_attn.q_proj.weight", ("Q", "H"), "matrix", "split_qkv"),
    ("{p}layers.{i}.self_attn.k_proj.weight", ("KV", "H"), "matrix", "split_qkv"),
    ("{p}layers.{i}.self_attn.v_proj.weight", ("KV", "H"), "matrix", "split_qkv"),
    ("{p}layers.{i}.self_attn.q_proj.bias", ("Q",), "bias", "qkv_bias"),
    ("{p}layers.{i}.self_attn.k_proj.bias", ("KV",), "bias", "qkv_bias"),
    ("{p}layers.{i}.self_attn.v_proj.bias", ("KV",), "bias", "qkv_bias"),
    ("{p}layers.{i}.self_attn.qkv_proj.weight", ("QKV", "H"), "matrix", "fused_qkv"),   # Phi-3: q|k|v rows
    ("{p}layers.{i}.self_attn.q_norm.weight", ("D",), "norm", "qk_norm"),               # per head, (head_dim,)
    ("{p}layers.{i}.self_attn.k_norm.weight", ("D",), "norm", "qk_norm"),
    ("{p}layers.{i}.self_attn.o_proj.weight", ("H", "Q"), "matrix", None),
    ("{p}layers.{i}.post_attention_layernorm.weight", ("H",), "norm", None),
    ("{p}layers.{i}.pre_feedforward_layernorm.weight", ("H",), "norm", "sandwich_norms"),  # Gemma 2/3
    ("{p}layers.{i}.post_feedforward_layernorm.weight", ("H",), "norm", "sandwich_norms"),
    ("{p}layers.{i}.mlp.gate_proj.weight", ("I", "H"), "matrix", "split_mlp"),
    ("{p}layers.{i}.mlp.up_proj.weight", ("I", "H"), "matrix", "split_mlp"),
    ("{p}layers.{i}.mlp.gate_up_proj.weight", ("I2", "H"), "matrix", "fused_mlp"),      # Phi-3: gate|up rows
    ("{p}layers.{i}.mlp.down_proj.weight", ("H", "I"), "matrix", None),
    ("{p}norm.weight", ("H",), "norm", None),
    ("{head}", ("V", "H"), "embed", "untied"),
)

# SigLIP vision tower + projector of Gemma3ForConditionalGeneration (random; converters of the text model skip
# them). Symbols: C vision hidden, F vision MLP, P patch side, N patches.
VISION_TENSORS: tuple[tuple[str, tuple[str, ...], str, str | None], ...] = (
    ("vision_tower.vision_model.embeddings.patch_embedding.weight", ("C", "RGB", "P", "P"), "matrix", None),
    ("vision_tower.vision_model.embeddings.patch_embedding.bias", ("C",), "bias", None),
    ("vision_tower.vision_model.embeddings.position_embedding.weight", ("N", "C"), "embed", None),
    *((f"vision_tower.vision_model.encoder.layers.{{i}}.{name}.{kind}", shape if kind == "weight" else shape[:1],
       init if kind == "weight" else "bias", None)
      for name, shape, init in (
          ("layer_norm1", ("C",), "norm"), ("self_attn.q_proj", ("C", "C"), "matrix"),
          ("self_attn.k_proj", ("C", "C"), "matrix"), ("self_attn.v_proj", ("C", "C"), "matrix"),
          ("self_attn.out_proj", ("C", "C"), "matrix"), ("layer_norm2", ("C",), "norm"),
          ("mlp.fc1", ("F", "C"), "matrix"), ("mlp.fc2", ("C", "F"), "matrix"))
      for kind in ("weight", "bias")),
    ("vision_tower.vision_model.post_layernorm.weight", ("C",), "norm", None),
    ("vision_tower.vision_model.post_layernorm.bias", ("C",), "bias", None),
    ("multi_modal_projector.mm_input_projection_weight", ("C", "H"), "matrix", None),
    ("multi_modal_projector.mm_soft_emb_norm.weight", ("C",), "gemma_norm", None),
)

VISION_CONFIG = {"hidden_size": 32, "image_size": 32, "intermediate_size": 64, "model_type": "siglip_vision_model",
                 "num_attention_heads": 2, "num_hidden_layers": 1, "patch_size": 8, "vision_use_head": False}

# Chat templates: shortened versions of each family's real template, same markup.
CHAT_TEMPLATES = {
    "llama2": ("{% if messages[0]['role'] == 'system' %}{% set system = '<<SYS>>\\n' + messages[0]['content'] + "
               "'\\n<</SYS>>\\n\\n' %}{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
               "{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
               "(system if loop.first else '') + message['content'] + ' [/INST]' }}{% elif message['role'] == "
               "'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"),
    "llama3": ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "mistral": ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
                "message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] "
                "+ eos_token }}{% endif %}{% endfor %}"),
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
               "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
               "{% endif %}{% endif %}"),
    "gemma": ("{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
              "else 'user' %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"),
    "phi3": ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"),
}


@dataclass(frozen=True)
class Variant:
    """One tiny architecture: its config.json (text part), tensor features, tokenizer and tokens."""
    config: Mapping[str, Any]                 # HF config keys; token ids are filled in from the tokenizer
    features: frozenset[str]                  # which optional TENSORS rows the checkpoint has
    tokenizer: str                            # key of tokenizers_tiny.SPM_KINDS / BPE_KINDS
    tokens: Mapping[str, str]                 # config id key -> token text ("eos_token_id": "</s>")
    tokenizer_config: Mapping[str, Any]       # tokenizer_config.json keys besides tokens and template
    chat_template: str
    generation: Mapping[str, Any] = field(default_factory=dict)   # generation_config.json extras
    eos_ids: tuple[str, ...] = ()             # generation_config eos list (token texts), if several
    norm_centre: float = 1.0                  # 0.0 for Gemma: stored w, the model multiplies by (1 + w)
    vocab_multiple: int = 1                   # config vocab_size rounds the tokenizer size up to this
    multimodal: bool = False                  # Gemma3ForConditionalGeneration wrapping


def _base(**overrides) -> dict[str, Any]:
    """Keys shared by the Llama-like configs at tiny size."""
    config = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 2048,
              "initializer_range": 0.02, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
              "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False, "use_cache": True}
    config.update(overrides)
    return config


_SEPARATE = frozenset({"split_qkv", "split_mlp"})
_SPM_TOKENS = {"bos_token_id": "<s>", "eos_token_id": "</s>"}
_GEMMA_TOKENS = {"pad_token_id": "<pad>", "eos_token_id": "<eos>", "bos_token_id": "<bos>"}
_GEMMA_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4,
               "num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8}
_GEMMA_GEN = {"cache_implementation": "hybrid", "do_sample": True, "top_k": 64, "top_p": 0.95}
_GEMMA_TOK = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "tokenizer_class": "GemmaTokenizer",
              "spaces_between_special_tokens": False}

VARIANTS: dict[str, Variant] = {
    # Llama 2: SentencePiece, untied head, plain RoPE
    "llama": Variant(
        _base(architectures=["LlamaForCausalLM"], model_type="llama", max_position_embeddings=4096,
              pretraining_tp=1, mlp_bias=False),
        _SEPARATE, "spm_llama", _SPM_TOKENS,
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "add_bos_token": True,
         "add_eos_token": False, "legacy": False, "tokenizer_class": "LlamaTokenizer"},
        CHAT_TEMPLATES["llama2"]),
    # Llama 3.2 / SmolLM: byte-level BPE, tied embeddings, llama3 RoPE scaling
    "llama3": Variant(
        _base(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=500000.0, tie_word_embeddings=True,
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 256},
              pretraining_tp=1, mlp_bias=False, head_dim=16),
        frozenset({"split_qkv", "split_mlp"}), "bpe_llama3",
        {"bos_token_id": "<|begin_of_text|>", "eos_token_id": "<|eot_id|>"},
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True, "add_eos_token": False,
         "tokenizer_class": "PreTrainedTokenizerFast"},
        CHAT_TEMPLATES["llama3"], {"do_sample": True, "temperature": 0.6, "top_p": 0.9},
        eos_ids=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")),
    # Mistral 7B v0.1: Llama layout plus a sliding window (4096, longer than the tests' sequences)
    "mistral": Variant(
        _base(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=4096, head_dim=16,
              max_position_embeddings=32768),
        _SEPARATE, "spm_llama", _SPM_TOKENS,
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
         "legacy": False, "tokenizer_class": "LlamaTokenizer"},
        CHAT_TEMPLATES["mistral"]),
    # Qwen2.5: q/k/v biases, BPE, tied, vocab padded past the tokenizer
    "qwen2": Variant(
        _base(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1000000.0,
              tie_word_embeddings=True, use_sliding_window=False, sliding_window=32768, max_window_layers=2,
              max_position_embeddings=32768),
        frozenset({"split_qkv", "split_mlp", "qkv_bias"}), "bpe_qwen2",
        {"bos_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>"},
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
         "add_eos_token": False, "tokenizer_class": "Qwen2Tokenizer", "errors": "replace",
         "split_special_tokens": False},
        CHAT_TEMPLATES["chatml"], {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                   "repetition_penalty": 1.05, "pad_token_id": "<|endoftext|>"},
        eos_ids=("<|im_end|>", "<|endoftext|>"), vocab_multiple=64),
    # Qwen3: q/k RMSNorm per head, explicit head_dim (4 x 32 = 128 != hidden 64), no biases
    "qwen3": Variant(
        _base(architectures=["Qwen3ForCausalLM"], model_type="qwen3", rms_norm_eps=1e-6, rope_theta=1000000.0,
              tie_word_embeddings=True, head_dim=32, intermediate_size=96, use_sliding_window=False,
              sliding_window=None, max_window_layers=2, max_position_embeddings=40960),
        frozenset({"split_qkv", "split_mlp", "qk_norm"}), "bpe_qwen3",
        {"bos_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>"},
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
         "add_eos_token": False, "tokenizer_class": "Qwen2Tokenizer", "errors": "replace",
         "split_special_tokens": False},
        CHAT_TEMPLATES["chatml"], {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20,
                                   "pad_token_id": "<|endoftext|>"},
        eos_ids=("<|im_end|>", "<|endoftext|>"), vocab_multiple=64),
    # Gemma 3 270M/1B style: 6 layers, sliding window on layers 0-4, global layer 5
    "gemma3_text": Variant(
        {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **_GEMMA_TEXT,
         "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768, "initializer_range": 0.02,
         "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
         "sliding_window_pattern": 6, "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
         "attention_bias": False, "attention_dropout": 0.0, "attn_logit_softcapping": None,
         "final_logit_softcapping": None, "tie_word_embeddings": True, "use_cache": True,
         "use_bidirectional_attention": False},
        frozenset({"split_qkv", "split_mlp", "qk_norm", "sandwich_norms"}), "spm_gemma", _GEMMA_TOKENS,
        _GEMMA_TOK, CHAT_TEMPLATES["gemma"], _GEMMA_GEN, eos_ids=("<eos>", "<end_of_turn>"), norm_centre=0.0),
    # Gemma 3 4B style: same text model inside Gemma3ForConditionalGeneration. Like the real 4B config.json,
    # text_config lists only what differs from Gemma3TextConfig's defaults (rope_theta 1e6, local base 1e4,
    # pattern 6, eps 1e-6 are implied) and global layers use linear RoPE scaling x8.
    "gemma3": Variant(
        {"model_type": "gemma3_text", **_GEMMA_TEXT, "rope_scaling": {"factor": 8.0, "rope_type": "linear"}},
        frozenset({"split_qkv", "split_mlp", "qk_norm", "sandwich_norms"}), "spm_gemma_mm", {},
        _GEMMA_TOK, CHAT_TEMPLATES["gemma"], _GEMMA_GEN, eos_ids=("<eos>", "<end_of_turn>"), norm_centre=0.0,
        vocab_multiple=64, multimodal=True),
    # Phi-3 mini: fused qkv_proj and gate_up_proj, SentencePiece + added chat tokens, padded vocab
    "phi3": Variant(
        _base(architectures=["Phi3ForCausalLM"], model_type="phi3", max_position_embeddings=4096,
              original_max_position_embeddings=4096, sliding_window=2047, embd_pdrop=0.0, resid_pdrop=0.0),
        frozenset({"fused_qkv", "fused_mlp"}), "spm_phi3",
        {"bos_token_id": "<s>", "eos_token_id": "<|endoftext|>", "pad_token_id": "<|endoftext|>"},
        {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>",
         "add_bos_token": False, "add_eos_token": False, "legacy": False, "tokenizer_class": "LlamaTokenizer"},
        CHAT_TEMPLATES["phi3"], eos_ids=("<|endoftext|>", "<|assistant|>", "<|end|>"), vocab_multiple=64),
}


def make_checkpoint(variant: str, out_dir: str | Path, *, dtype: str = "f32", seed: int = 0, shards: int = 1,
                    **config_overrides: Any) -> Path:
    """Write a tiny random HF checkpoint of ``variant`` into ``out_dir`` and return the directory.

    ``dtype`` is "f32", "f16" or "bf16" (the stored tensor type); ``shards`` > 1 splits the weights into
    model-0000k-of-0000n.safetensors files with an index; ``config_overrides`` replace keys of the (text)
    config before the tensors are sized, e.g. ``num_hidden_layers=3`` or ``sliding_window=4``.
    Raises KeyError for an unknown variant or dtype and ValueError for shards < 1.
    """
    spec = VARIANTS[variant]
    torch_dtype, st_dtype = DTYPES[dtype]
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tok = tokenizers_tiny.build(spec.tokenizer)
    text = _text_config(spec, tok, config_overrides)
    tensors = _weights(spec, text, seed)
    _write_weights(out, tensors, st_dtype, shards)
    _write_json(out / "config.json", _config(spec, text, tok, torch_dtype))
    _write_json(out / "generation_config.json", _generation_config(spec, text, tok))
    _write_json(out / "tokenizer_config.json", _tokenizer_config(spec, tok))
    _write_json(out / "special_tokens_map.json", _special_tokens_map(spec))
    if tok.added and "tokenizer.model" in tok.files:     # Phi-3 and Gemma 3 4B ship added_tokens.json
        _write_json(out / "added_tokens.json", {text_: ident for ident, text_, _ in tok.added})
    for name, blob in tok.files.items():
        (out / name).write_bytes(blob)
    return out


# Files an earlier make_checkpoint call may have left that this one might not overwrite (other shard count,
# other tokenizer kind); a leftover would make the directory an ambiguous checkpoint.
_GENERATED_GLOBS = ("model*.safetensors", "model.safetensors.index.json", "tokenizer.model", "tokenizer.json",
                    "added_tokens.json")


def _remove_stale(out: Path) -> None:
    for pattern in _GENERATED_GLOBS:
        for path in out.glob(pattern):
            path.unlink()


def _text_config(spec: Variant, tok: tokenizers_tiny.TokenizerBuild, overrides: Mapping[str, Any]) -> dict:
    """The text model's config with token ids and vocab size filled in, then the caller's overrides."""
    config = dict(spec.config)
    config["vocab_size"] = -(-tok.size // spec.vocab_multiple) * spec.vocab_multiple
    config.update({key: tok.ids[text] for key, text in spec.tokens.items()})
    config.update(overrides)
    resized = {"num_hidden_layers", "sliding_window_pattern"} & set(overrides)
    if "layer_types" in config and resized and "layer_types" not in overrides:   # keep Gemma's pattern consistent
        pattern = config.get("sliding_window_pattern", 6)
        config["layer_types"] = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                 for i in range(config["num_hidden_layers"])]
    return config


def _config(spec: Variant, text: dict, tok: tokenizers_tiny.TokenizerBuild, torch_dtype: str) -> dict:
    """config.json: the text config itself, or the Gemma3ForConditionalGeneration wrapper around it."""
    if not spec.multimodal:
        return {**text, "torch_dtype": torch_dtype, "transformers_version": "4.57.1"}
    return {"architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": tok.ids["<start_of_image>"],
            "eoi_token_index": tok.ids["<end_of_image>"], "eos_token_id": [tok.ids[t] for t in spec.eos_ids],
            "image_token_index": tok.ids["<image_soft_token>"], "initializer_range": 0.02,
            "mm_tokens_per_image": 4, "model_type": "gemma3", "text_config": text, "torch_dtype": torch_dtype,
            "transformers_version": "4.57.1", "vision_config": VISION_CONFIG}


def _dims(text: Mapping[str, Any]) -> dict[str, int]:
    """Shape symbols of the tensor tables, from a text config (and the fixed vision config)."""
    heads, kv_heads = text["num_attention_heads"], text.get("num_key_value_heads") or text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    vision = VISION_CONFIG
    return {"V": text["vocab_size"], "H": text["hidden_size"], "I": text["intermediate_size"],
            "I2": 2 * text["intermediate_size"], "D": head_dim, "Q": heads * head_dim, "KV": kv_heads * head_dim,
            "QKV": (heads + 2 * kv_heads) * head_dim, "C": vision["hidden_size"], "F": vision["intermediate_size"],
            "P": vision["patch_size"], "RGB": 3, "N": (vision["image_size"] // vision["patch_size"]) ** 2}


def _names(spec: Variant, text: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of every tensor, in the order they are drawn from the generator."""
    prefix, head = ("language_model.model.", "language_model.lm_head.weight") if spec.multimodal \
        else ("model.", "lm_head.weight")
    # untied only when the config says so: Gemma 3's sparse text_config omits the key and is tied by default
    features = set(spec.features) | (set() if text.get("tie_word_embeddings", True) else {"untied"})
    dims = _dims(text)
    rows = [(n, s, i) for n, s, i, f in TENSORS if f is None or f in features]
    if spec.multimodal:
        rows += [(n, s, i) for n, s, i, _ in VISION_TENSORS]
    out = []
    for name, shape, init in rows:
        n_layers = VISION_CONFIG["num_hidden_layers"] if name.startswith("vision") else text["num_hidden_layers"]
        for i in range(n_layers) if "{i}" in name else [None]:
            out.append((name.format(p=prefix, i=i, head=head), tuple(dims[s] for s in shape), init))
    return out


def _weights(spec: Variant, text: Mapping[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Random float32 tensors, drawn in table order from one generator."""
    rng = np.random.default_rng(seed)
    inits = {
        "embed": lambda shape: EMBED_STD,
        "matrix": lambda shape: 1.0 / math.sqrt(int(np.prod(shape[1:]))),
        "bias": lambda shape: BIAS_STD,
        "norm": lambda shape: NORM_NOISE,
        "gemma_norm": lambda shape: NORM_NOISE,
    }
    centres = {"norm": spec.norm_centre, "gemma_norm": 0.0}
    tensors = {}
    for name, shape, init in _names(spec, text):
        values = rng.standard_normal(shape, dtype=np.float32) * np.float32(inits[init](shape))
        tensors[name] = values + np.float32(centres.get(init, 0.0))
    return tensors


def _write_weights(out: Path, tensors: dict[str, np.ndarray], st_dtype: str, shards: int) -> None:
    """model.safetensors, or ``shards`` files split by bytes plus model.safetensors.index.json."""
    convert = {"F32": lambda a: a, "F16": lambda a: a.astype(np.float16), "BF16": safetensors.f32_to_bf16}[st_dtype]
    stored = {name: convert(array) for name, array in tensors.items()}
    dtypes = {name: st_dtype for name in stored}
    metadata = {"format": "pt"}
    if shards == 1:
        safetensors.write(out / "model.safetensors", stored, dtypes=dtypes, metadata=metadata)
        return
    groups = _split_by_bytes(list(stored), [stored[n].nbytes for n in stored], shards)
    weight_map = {}
    for k, names in enumerate(groups, start=1):
        file = f"model-{k:05d}-of-{shards:05d}.safetensors"
        safetensors.write(out / file, {n: stored[n] for n in names}, dtypes=dtypes, metadata=metadata)
        weight_map.update({n: file for n in names})
    total = sum(a.nbytes for a in stored.values())
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _split_by_bytes(names: list[str], sizes: list[int], parts: int) -> list[list[str]]:
    """Contiguous groups of names with roughly equal bytes; exactly ``parts`` groups, none empty."""
    if parts > len(names):
        raise ValueError(f"cannot split {len(names)} tensors into {parts} shards")
    target = sum(sizes) / parts
    groups: list[list[str]] = [[]]
    done = 0                                   # bytes placed so far
    for index, (name, size) in enumerate(zip(names, sizes)):
        must_open = len(names) - index <= parts - len(groups)     # one tensor left per missing group
        if groups[-1] and (done >= target * len(groups) or must_open):
            groups.append([])
        groups[-1].append(name)
        done += size
    return groups


def _generation_config(spec: Variant, text: Mapping[str, Any], tok: tokenizers_tiny.TokenizerBuild) -> dict:
    config: dict[str, Any] = {"_from_model_config": False}
    for key in ("bos_token_id", "pad_token_id"):
        if text.get(key) is not None:
            config[key] = text[key]
    config["eos_token_id"] = [tok.ids[t] for t in spec.eos_ids] if spec.eos_ids else text.get("eos_token_id")
    for key, value in spec.generation.items():
        config[key] = tok.ids[value] if key.endswith("_token_id") else value
    config["transformers_version"] = "4.57.1"
    return config


def _tokenizer_config(spec: Variant, tok: tokenizers_tiny.TokenizerBuild) -> dict:
    """tokenizer_config.json: special tokens, add_bos/eos flags, added tokens and the chat template."""
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": special} for i, t, special in tok.added}
    for text, ident in tok.ids.items():
        decoder.setdefault(str(ident), {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": True})
    decoder = dict(sorted(decoder.items(), key=lambda kv: int(kv[0])))
    return {"clean_up_tokenization_spaces": False, "model_max_length": 2048,
            "model_input_names": ["input_ids", "attention_mask"], **spec.tokenizer_config,
            "added_tokens_decoder": decoder, "chat_template": spec.chat_template}


def _special_tokens_map(spec: Variant) -> dict:
    return {k: v for k, v in spec.tokenizer_config.items() if k.endswith("_token") and v is not None}


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
