"""``ModelSpec``: the one normalized description of a decoder-only model, derived from config.json.

HF configs name the same quantity differently across families (``hidden_size``/``n_embd``/``dim``), leave
keys out when the transformers config class has a default, and nest the text model of multimodal wrappers
under ``text_config``. ``hparams()`` resolves all of that into one flat dict (raw config + the architecture's
defaults) and ``ModelSpec.from_hparams`` reads the fields the converters and the memory planner need.
Nothing here reads files: callers pass the parsed config.json.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

# spec field -> config keys tried in order (the lists llama.cpp's convert_hf_to_gguf.py searches, TextModel)
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "n_layers": ("n_layers", "num_hidden_layers", "n_layer", "num_layers"),
    "n_embd": ("hidden_size", "n_embd", "dim"),
    "n_ff": ("intermediate_size", "n_inner", "hidden_dim"),
    "n_head": ("num_attention_heads", "n_head", "n_heads"),
    "n_kv_head": ("num_key_value_heads", "n_kv_heads"),
    "vocab_size": ("vocab_size",),
    "context_length": ("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length",
                       "model_max_length"),
    "norm_eps": ("rms_norm_eps", "norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"),
    "activation": ("hidden_activation", "hidden_act", "activation_function"),
    "rope_theta": ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"),
    "rope_theta_local": ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                         "rope_local_base_freq"),
    "partial_rotary_factor": ("partial_rotary_factor", "rope_pct", "rope_percent"),
}

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class Traits:
    """What a family always is, whatever its config says (set per architecture module)."""

    qk_norm: bool = False               # RMSNorm on each head of Q and K (gemma3, qwen3)
    qkv_bias: bool | None = False       # None: read ``attention_bias`` from the config (llama)
    fused_qkv: bool = False             # Q, K, V stored as one qkv_proj (phi3)
    fused_gate_up: bool = False         # gate and up stored as one gate_up_proj (phi3)
    norm_weight_offset: float = 0.0     # the model computes x * (offset + w) in its RMSNorms (gemma: 1)
    sqrt_embedding_scale: bool = False  # token embeddings are multiplied by sqrt(n_embd) (gemma)
    default_swa_pattern: int = 0        # every n-th layer is global when layer_types is absent (gemma3: 6)


@dataclass(frozen=True)
class RopeScaling:
    """Context-extension scheme of the rotary embedding (HF ``rope_scaling`` / ``rope_parameters``)."""

    type: str                                   # "linear", "yarn", "llama3", "longrope", "dynamic", ...
    factor: float | None = None
    original_context_length: int | None = None
    params: dict[str, Any] = field(default_factory=dict)   # everything else (low_freq_factor, long_factor...)


@dataclass(frozen=True)
class ModelSpec:
    """What a decoder-only transformer is: sizes, attention layout, rope, norms. All lengths in elements."""

    model_type: str                 # canonical architecture key (registry module name), e.g. "gemma3"
    hf_model_type: str              # as written in config.json, e.g. "gemma3_text"
    architecture: str | None        # config.json architectures[0], e.g. "Gemma3ForCausalLM"
    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_kv_head: int
    head_dim: int                   # per-head length of Q/K/V
    vocab_size: int
    context_length: int             # trained maximum (max_position_embeddings)
    norm_eps: float
    activation: str                 # HF name: "silu", "gelu_pytorch_tanh", ...
    rope_theta: float
    rope_theta_local: float | None  # theta of sliding-window layers when it differs (gemma3)
    rope_dim: int                   # rotated dimensions per head (partial rotary: < head_dim)
    rope_scaling: RopeScaling | None
    sliding_window: int | None      # tokens a sliding layer attends to; None when no layer slides
    swa_layers: tuple[bool, ...]    # per layer: True when it uses the sliding window
    tie_embeddings: bool            # output projection shares token_embd
    qk_norm: bool
    qkv_bias: bool
    fused_qkv: bool
    fused_gate_up: bool
    norm_weight_offset: float       # RMSNorm computes x * (offset + w)
    embedding_scale: float          # token embeddings are multiplied by this
    attention_scale: float          # softmax(Q K^T * attention_scale)
    final_logit_softcap: float | None
    torch_dtype: str | None         # what config.json claims the weights are ("bfloat16"...); may lie

    @classmethod
    def from_hparams(cls, hp: Mapping[str, Any], model_type: str, traits: Traits) -> "ModelSpec":
        """Build a spec from ``hparams()`` output. Raises KeyError naming the missing config keys."""
        n_embd, n_head = int(_need(hp, "n_embd")), int(_need(hp, "n_head"))
        head_dim = int(hp.get("head_dim") or n_embd // n_head)
        n_layers = int(_need(hp, "n_layers"))
        rope = rope_parameters(hp)
        full = rope.get(FULL, rope)
        window, swa = sliding_layers(hp, n_layers, traits.default_swa_pattern)
        partial = float(full.get("partial_rotary_factor") or 1.0)
        scalar = hp.get("query_pre_attn_scalar")
        return cls(
            model_type=model_type, hf_model_type=str(hp.get("model_type", model_type)),
            architecture=(hp.get("architectures") or [None])[0],
            n_layers=n_layers, n_embd=n_embd, n_ff=int(_need(hp, "n_ff")), n_head=n_head,
            n_kv_head=int(find(hp, "n_kv_head") or n_head), head_dim=head_dim,
            vocab_size=int(_need(hp, "vocab_size")), context_length=int(_need(hp, "context_length")),
            norm_eps=float(_need(hp, "norm_eps")), activation=str(find(hp, "activation") or "silu"),
            rope_theta=float(full.get("rope_theta", 10000.0)),
            rope_theta_local=_float_or_none(rope.get(SLIDING, {}).get("rope_theta")),
            rope_dim=int(partial * n_embd) // n_head if partial != 1.0 else head_dim,
            rope_scaling=rope_scaling(full, hp),
            sliding_window=window, swa_layers=swa,
            tie_embeddings=bool(hp.get("tie_word_embeddings", False)),
            qk_norm=traits.qk_norm,
            qkv_bias=bool(hp.get("attention_bias", False)) if traits.qkv_bias is None else traits.qkv_bias,
            fused_qkv=traits.fused_qkv, fused_gate_up=traits.fused_gate_up,
            norm_weight_offset=traits.norm_weight_offset,
            embedding_scale=math.sqrt(n_embd) if traits.sqrt_embedding_scale else 1.0,
            attention_scale=float(scalar) ** -0.5 if scalar else head_dim ** -0.5,
            final_logit_softcap=_float_or_none(hp.get("final_logit_softcapping")),
            torch_dtype=hp.get("torch_dtype") or hp.get("dtype"),
        )

    def kv_elements_per_token(self, layer: int) -> int:
        """K and V elements one token adds to ``layer``'s cache (2 * n_kv_head * head_dim)."""
        del layer  # every layer of the supported families has the same KV width
        return 2 * self.n_kv_head * self.head_dim

    def kv_cells(self, layer: int, n_ctx: int) -> int:
        """Tokens ``layer`` must keep for a context of ``n_ctx``: the window for sliding layers."""
        if self.swa_layers[layer] and self.sliding_window:
            return min(n_ctx, self.sliding_window)
        return n_ctx

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (for --json output and manifests)."""
        data = asdict(self)
        data["swa_layers"] = list(self.swa_layers)
        return data


def find(hp: Mapping[str, Any], field_name: str) -> Any:
    """The first present config value among ``CONFIG_KEYS[field_name]`` (None when none is)."""
    return next((hp[k] for k in CONFIG_KEYS[field_name] if hp.get(k) is not None), None)


def _need(hp: Mapping[str, Any], field_name: str) -> Any:
    value = find(hp, field_name)
    if value is None:
        raise KeyError(f"config.json has none of {', '.join(CONFIG_KEYS[field_name])}")
    return value


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def hparams(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """config.json flattened the way llama.cpp sees it: ``text_config`` lifted to the top, defaults filled.

    ``defaults`` are the transformers config class defaults of the architecture, which llama.cpp's converter
    sees because it loads the config through ``AutoConfig``: a value applies when the key is absent (an
    explicit null stays null, e.g. ``sliding_window: null``); a function f(hparams) is what the class computes
    when the key is absent or null (``head_dim = hidden_size // num_attention_heads``).
    """
    hp = dict(config)
    if isinstance(config.get("text_config"), Mapping):
        hp.update(config["text_config"])
    for key, value in defaults.items():
        if _has_alias(hp, key):
            continue
        if callable(value) and hp.get(key) is None:
            hp[key] = value(hp)
        elif key not in hp:
            hp[key] = value
    return hp


def _has_alias(hp: Mapping[str, Any], key: str) -> bool:
    """Whether another spelling of ``key`` is set (a default must not shadow ``n_embd`` with ``hidden_size``)."""
    return any(key in keys and any(k != key and hp.get(k) is not None for k in keys) for keys in CONFIG_KEYS.values())


def rope_parameters(hp: Mapping[str, Any]) -> dict[str, Any]:
    """``rope_parameters`` (transformers >= 5) or ``rope_scaling``, with theta and friends mirrored in.

    Per-layer-type dicts (``full_attention``/``sliding_attention``) are kept as they are.
    """
    rope = dict(hp.get("rope_parameters") or hp.get("rope_scaling") or {})
    if FULL in rope or SLIDING in rope:
        return rope
    if (local := find(hp, "rope_theta_local")) is not None:
        rope[SLIDING] = {"rope_theta": local}
    mirrored = {"rope_theta": find(hp, "rope_theta"), "rope_type": rope.get("type"),
                "partial_rotary_factor": find(hp, "partial_rotary_factor"),
                "original_max_position_embeddings": hp.get("original_max_position_embeddings")}
    for key, value in mirrored.items():
        if key not in rope and value is not None:
            rope[key] = value
    return rope


_ROPE_CORE = ("rope_type", "type", "factor", "rope_theta", "original_max_position_embeddings",
              "partial_rotary_factor")


def rope_scaling(full: Mapping[str, Any], hp: Mapping[str, Any]) -> RopeScaling | None:
    """The context-extension scheme, or None for plain RoPE (``rope_type`` absent or "default")."""
    kind = full.get("rope_type") or full.get("type")
    if kind in (None, "default"):
        return None
    original = full.get("original_max_position_embeddings", hp.get("original_max_position_embeddings"))
    return RopeScaling(type=str(kind), factor=_float_or_none(full.get("factor")),
                       original_context_length=None if original is None else int(original),
                       params={k: v for k, v in full.items() if k not in _ROPE_CORE})


def sliding_layers(hp: Mapping[str, Any], n_layers: int, default_pattern: int) -> tuple[int | None, tuple[bool, ...]]:
    """(window, per-layer sliding flags) from ``layer_types``, ``sliding_window_pattern`` or the family default.

    Families without per-layer types slide every layer when a window is set and enabled (mistral, phi3);
    qwen2/qwen3 only when ``use_sliding_window`` is true.
    """
    window = hp.get("sliding_window")
    if not window or hp.get("use_sliding_window") is False:
        return None, (False,) * n_layers
    if isinstance(hp.get("layer_types"), list) and len(hp["layer_types"]) == n_layers:
        flags = tuple(t == SLIDING for t in hp["layer_types"])
    elif pattern := hp.get("sliding_window_pattern") or hp.get("_sliding_window_pattern") or default_pattern:
        flags = tuple((i + 1) % int(pattern) != 0 for i in range(n_layers))
    else:
        flags = (True,) * n_layers
    return (int(window) if any(flags) else None), flags
