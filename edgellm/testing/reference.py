"""Numpy reference forward pass of a Hugging Face checkpoint: the oracle every converter is checked against.

``forward(model_dir, token_ids)`` reads config.json and the safetensors files (memory-mapped; bf16/f16 weights
widened to float32 one layer at a time) and computes the logits the way HF transformers' modeling code does
for each supported ``model_type``. Matrix products are float32 GEMMs; norms, RoPE, softmax and the residual
stream are float64, so the result matches transformers' float32 output to about 1e-6 relative. The differences between architectures are data (``ARCHS``): tensor names, norm
flavour, activation, which layers use a sliding window, RoPE bases and scaling, attention scale, embedding
scale. Facts were read from transformers' modeling_{llama,mistral,qwen2,qwen3,gemma3,phi3}.py and
modeling_rope_utils.py; the tiny checkpoints' goldens (tests/fixtures/golden) pin it to transformers' output.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from edgellm.errors import CheckpointError, UnsupportedArchitectureError
from edgellm.safetensors import SafetensorsFile, bf16_to_f32

LOGIT_CHUNK = 16384     # vocabulary rows widened at a time for the output head (Gemma: 262144 rows)

# Per-layer tensor roles -> names relative to the text-model prefix. Missing optional roles are skipped.
_LLAMA_NAMES = {
    "attn_norm": "layers.{i}.input_layernorm.weight",
    "q": "layers.{i}.self_attn.q_proj.weight", "k": "layers.{i}.self_attn.k_proj.weight",
    "v": "layers.{i}.self_attn.v_proj.weight", "o": "layers.{i}.self_attn.o_proj.weight",
    "q_bias": "layers.{i}.self_attn.q_proj.bias", "k_bias": "layers.{i}.self_attn.k_proj.bias",
    "v_bias": "layers.{i}.self_attn.v_proj.bias", "o_bias": "layers.{i}.self_attn.o_proj.bias",
    "ffn_norm": "layers.{i}.post_attention_layernorm.weight",
    "gate": "layers.{i}.mlp.gate_proj.weight", "up": "layers.{i}.mlp.up_proj.weight",
    "down": "layers.{i}.mlp.down_proj.weight",
}
_QK_NORM = {"q_norm": "layers.{i}.self_attn.q_norm.weight", "k_norm": "layers.{i}.self_attn.k_norm.weight"}
_GEMMA_NAMES = {
    **_LLAMA_NAMES, **_QK_NORM,
    "attn_post_norm": "layers.{i}.post_attention_layernorm.weight",   # Gemma: applied to the attention output
    "ffn_norm": "layers.{i}.pre_feedforward_layernorm.weight",
    "ffn_post_norm": "layers.{i}.post_feedforward_layernorm.weight",
}
_PHI3_NAMES = {
    **{k: v for k, v in _LLAMA_NAMES.items() if k not in ("q", "k", "v", "gate", "up")},
    "qkv": "layers.{i}.self_attn.qkv_proj.weight",        # rows: q (heads*dim) | k (kv*dim) | v (kv*dim)
    "gate_up": "layers.{i}.mlp.gate_up_proj.weight",      # rows: gate (ffn) | up (ffn)
}
OPTIONAL_ROLES = frozenset({"q_bias", "k_bias", "v_bias", "o_bias"})


@dataclass(frozen=True)
class Arch:
    """How one HF ``model_type`` computes, as data."""
    names: Mapping[str, str]
    defaults: Mapping[str, Any]              # HF config-class defaults for keys a config.json may omit
    norm_offset: float = 0.0                 # Gemma's RMSNorm multiplies by (1 + w)
    act_key: str = "hidden_act"
    window_rule: str = "none"                # key of WINDOW_RULES: which layers use config["sliding_window"]
    local_rope_key: str | None = None        # Gemma 3: sliding layers use this base and no scaling
    attn_scale_key: str | None = None        # Gemma: scores scaled by key**-0.5 instead of head_dim**-0.5
    embed_scale: bool = False                # Gemma: embeddings times sqrt(hidden_size)


@dataclass(frozen=True)
class Wrapper:
    """A multimodal checkpoint whose text model sits under a sub-config and a tensor prefix."""
    text_key: str
    prefixes: tuple[str, ...]                # tried in order; the first with embed_tokens wins
    heads: tuple[str, ...]


_LLAMA_DEFAULTS = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False}
_GEMMA3_DEFAULTS = {  # transformers' Gemma3TextConfig
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6,
}

ARCHS: dict[str, Arch] = {
    "llama": Arch(_LLAMA_NAMES, _LLAMA_DEFAULTS),
    "mistral": Arch(_LLAMA_NAMES, {**_LLAMA_DEFAULTS, "sliding_window": 4096}, window_rule="all"),
    "qwen2": Arch(_LLAMA_NAMES, {**_LLAMA_DEFAULTS, "use_sliding_window": False, "max_window_layers": 28},
                  window_rule="after_max_window_layers"),
    "qwen3": Arch({**_LLAMA_NAMES, **_QK_NORM}, {**_LLAMA_DEFAULTS, "use_sliding_window": False,
                                                  "max_window_layers": 28}, window_rule="after_max_window_layers"),
    "phi3": Arch(_PHI3_NAMES, {**_LLAMA_DEFAULTS, "rms_norm_eps": 1e-5, "sliding_window": None}, window_rule="all"),
    "gemma3_text": Arch(_GEMMA_NAMES, _GEMMA3_DEFAULTS, norm_offset=1.0, act_key="hidden_activation",
                        window_rule="pattern", local_rope_key="rope_local_base_freq",
                        attn_scale_key="query_pre_attn_scalar", embed_scale=True),
}
WRAPPERS: dict[str, Wrapper] = {
    # Hub checkpoints use language_model.model.*; transformers >= 5 saves model.language_model.*
    "gemma3": Wrapper("text_config", ("language_model.model.", "model.language_model."),
                      ("language_model.lm_head.weight", "lm_head.weight")),
}
PLAIN = Wrapper("", ("model.",), ("lm_head.weight",))

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "gelu_pytorch_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x**3))),
}
ACTIVATIONS["swish"] = ACTIVATIONS["silu"]
ACTIVATIONS["gelu_new"] = ACTIVATIONS["gelu_pytorch_tanh"]


# ---------------------------------------------------------------- which layers slide

def _layer_is_sliding(config: Mapping[str, Any], rule: str) -> list[bool]:
    n = config["num_hidden_layers"]
    if config.get("layer_types"):
        return [kind == "sliding_attention" for kind in config["layer_types"]]
    return WINDOW_RULES[rule](config, n)


WINDOW_RULES: dict[str, Callable[[Mapping[str, Any], int], list[bool]]] = {
    "none": lambda c, n: [False] * n,
    "all": lambda c, n: [c.get("sliding_window") is not None] * n,                     # Mistral, Phi-3
    "after_max_window_layers": lambda c, n: [bool(c.get("use_sliding_window")) and c.get("sliding_window") is not None
                                             and i >= c["max_window_layers"] for i in range(n)],  # Qwen2/3
    "pattern": lambda c, n: [(i + 1) % c["sliding_window_pattern"] != 0 for i in range(n)],     # Gemma 3
}


# ---------------------------------------------------------------- RoPE

def _rope_default(params: Mapping[str, Any], dim: int) -> np.ndarray:
    """Inverse frequencies theta^(-2i/dim), i < dim/2, shape (dim/2,) float64."""
    return 1.0 / params["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def _rope_linear(params: Mapping[str, Any], dim: int) -> np.ndarray:
    return _rope_default(params, dim) / params["factor"]       # positions divided by factor


def _rope_llama3(params: Mapping[str, Any], dim: int) -> np.ndarray:
    """Llama 3.1 scaling: long wavelengths divided by factor, short kept, a smooth blend in between."""
    inv = _rope_default(params, dim)
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    original = params["original_max_position_embeddings"]
    wavelen = 2.0 * math.pi / inv
    smooth = (original / wavelen - low) / (high - low)
    blended = (1.0 - smooth) * inv / factor + smooth * inv
    scaled = np.where(wavelen > original / low, inv / factor, inv)
    middle = (wavelen >= original / high) & (wavelen <= original / low)
    return np.where(middle, blended, scaled)


ROPE_TYPES: dict[str, Callable[[Mapping[str, Any], int], np.ndarray]] = {
    "default": _rope_default, "linear": _rope_linear, "llama3": _rope_llama3,
}


def _rope_params(config: Mapping[str, Any], arch: Arch, sliding: bool) -> dict[str, Any]:
    """RoPE parameters of one layer, from old-style (rope_theta + rope_scaling) or new-style rope_parameters."""
    layer_type = "sliding_attention" if sliding else "full_attention"
    new = config.get("rope_parameters")
    if new:
        params = dict(new.get(layer_type, new))
    elif sliding and arch.local_rope_key:
        params = {"rope_theta": config[arch.local_rope_key]}           # Gemma 3 local layers: no scaling
    else:
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config["rope_theta"])
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", config.get("rope_theta"))
    return params


def _inv_freq(params: Mapping[str, Any], dim: int, path: str) -> np.ndarray:
    rope_type = params["rope_type"]
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(path=path, problem=f"rope_type {rope_type!r} is not implemented by the reference "
                                                 f"(known: {sorted(ROPE_TYPES)})")
    return ROPE_TYPES[rope_type](params, dim)


def _apply_rope(x: np.ndarray, inv_freq: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """rotate_half RoPE on the first 2*len(inv_freq) dims of x (n_tokens, heads, head_dim); the rest pass."""
    rot = 2 * len(inv_freq)
    angles = positions[:, None] * inv_freq[None, :]                        # (n_tokens, rot/2)
    cos = np.concatenate([np.cos(angles)] * 2, axis=-1)[:, None, :]       # (n_tokens, 1, rot)
    sin = np.concatenate([np.sin(angles)] * 2, axis=-1)[:, None, :]
    head, rest = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = np.concatenate([-head[..., half:], head[..., :half]], axis=-1)
    return np.concatenate([head * cos + rotated * sin, rest], axis=-1)


# ---------------------------------------------------------------- model description

@dataclass
class Model:
    """A resolved checkpoint: hyperparameters, per-layer settings and the tensor reader."""
    path: Path
    arch: Arch
    config: dict[str, Any]
    files: dict[str, SafetensorsFile]        # tensor name -> the file holding it
    prefix: str
    head: str                                # output head tensor name (the embedding when tied)
    sliding: list[bool] = field(default_factory=list)
    inv_freqs: list[np.ndarray] = field(default_factory=list)

    def tensor(self, name: str) -> np.ndarray:
        """A tensor as float32 (zero-copy when stored as F32); raises CheckpointError if it is missing."""
        if name not in self.files:
            raise CheckpointError(path=str(self.path), problem=f"tensor {name!r} is missing")
        return self.files[name].float32(name)

    def layer(self, i: int) -> dict[str, np.ndarray]:
        out = {}
        for role, template in self.arch.names.items():
            name = self.prefix + template.format(i=i)
            if name in self.files or role not in OPTIONAL_ROLES:
                out[role] = self.tensor(name)
        return out

    @property
    def head_dim(self) -> int:
        return self.config.get("head_dim") or self.config["hidden_size"] // self.config["num_attention_heads"]

    def close(self) -> None:
        for f in {id(f): f for f in self.files.values()}.values():
            f.close()


def load(model_dir: str | Path) -> Model:
    """Read config.json and map every tensor name to its safetensors file (memory-mapped, nothing copied).

    Raises CheckpointError for a missing/broken config or weights and UnsupportedArchitectureError for a
    model_type the reference does not know.
    """
    path = Path(model_dir)
    try:
        outer = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(path=str(path / "config.json"), problem=str(exc)) from None
    wrapper = WRAPPERS.get(outer.get("model_type"), PLAIN)
    text = outer.get(wrapper.text_key, {}) if wrapper.text_key else outer
    model_type = text.get("model_type") or ("gemma3_text" if wrapper is WRAPPERS.get("gemma3") else None)
    if model_type not in ARCHS:
        raise UnsupportedArchitectureError(model_type=str(model_type), supported=sorted([*ARCHS, *WRAPPERS]))
    arch = ARCHS[model_type]
    config = {**arch.defaults, **text}          # an explicit null (Mistral v0.3's sliding_window) stays null
    if wrapper.text_key and "tie_word_embeddings" in outer:
        config.setdefault("tie_word_embeddings", outer["tie_word_embeddings"])
    files = _open_weights(path)
    prefix = next((p for p in wrapper.prefixes if p + "embed_tokens.weight" in files), wrapper.prefixes[0])
    head = next((h for h in wrapper.heads if h in files), None)
    model = Model(path, arch, config, files, prefix, head or prefix + "embed_tokens.weight")
    if head is None and not config.get("tie_word_embeddings", False):
        raise CheckpointError(path=str(path), problem=f"no output head ({' or '.join(wrapper.heads)}) and the "
                                                      "config does not tie the embeddings")
    model.sliding = _layer_is_sliding(config, arch.window_rule)
    rot_dim = int(model.head_dim * config.get("partial_rotary_factor", 1.0))
    model.inv_freqs = [_inv_freq(_rope_params(config, arch, s), rot_dim, str(path)) for s in model.sliding]
    return model


def _open_weights(path: Path) -> dict[str, SafetensorsFile]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        opened = {file: SafetensorsFile(path / file) for file in sorted(set(weight_map.values()))}
        return {name: opened[file] for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(path=str(path), problem="no model.safetensors or model.safetensors.index.json")
    f = SafetensorsFile(single)
    return {name: f for name in f.names()}


# ---------------------------------------------------------------- the computation

def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, offset: float) -> np.ndarray:
    """RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * (offset + w), in float64."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (offset + weight.astype(np.float64))


def _linear(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x (n, in) @ weight.T (out, in) as a float32 GEMM (weights are never widened), result float64.

    Written as (weight @ x.T).T: with few tokens OpenBLAS runs this orientation 3-5x faster here."""
    return (weight @ x.astype(np.float32).T).T.astype(np.float64)


def _qkv(model: Model, w: Mapping[str, np.ndarray], h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Projections, (n_tokens, heads, head_dim) each, with biases when the checkpoint has them."""
    c, d = model.config, model.head_dim
    heads, kv_heads = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    if "qkv" in w:
        q, k, v = np.split(_linear(h, w["qkv"]), [heads * d, (heads + kv_heads) * d], axis=-1)
    else:
        q, k, v = _linear(h, w["q"]), _linear(h, w["k"]), _linear(h, w["v"])
    q, k, v = (x + w[b] if b in w else x for x, b in ((q, "q_bias"), (k, "k_bias"), (v, "v_bias")))
    n = h.shape[0]
    return q.reshape(n, heads, d), k.reshape(n, kv_heads, d), v.reshape(n, kv_heads, d)


def _attention(model: Model, i: int, w: Mapping[str, np.ndarray], h: np.ndarray) -> np.ndarray:
    """Self-attention of layer i on normed input h (n_tokens, hidden) -> (n_tokens, hidden)."""
    c, arch = model.config, model.arch
    q, k, v = _qkv(model, w, h)
    if "q_norm" in w:                                   # Qwen3 / Gemma 3: RMSNorm per head before RoPE
        q = _rms_norm(q, w["q_norm"], c["rms_norm_eps"], arch.norm_offset)
        k = _rms_norm(k, w["k_norm"], c["rms_norm_eps"], arch.norm_offset)
    positions = np.arange(h.shape[0], dtype=np.float64)
    q, k = _apply_rope(q, model.inv_freqs[i], positions), _apply_rope(k, model.inv_freqs[i], positions)
    group = q.shape[1] // k.shape[1]                    # GQA: query head j reads kv head j // group
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scale = (c[arch.attn_scale_key] if arch.attn_scale_key else model.head_dim) ** -0.5
    scores = np.einsum("qhd,khd->hqk", q, k) * scale    # (heads, n_q, n_k)
    if c.get("attn_logit_softcapping"):
        cap = c["attn_logit_softcapping"]
        scores = np.tanh(scores / cap) * cap
    scores = np.where(_mask(h.shape[0], c.get("sliding_window") if model.sliding[i] else None), scores, -np.inf)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", probs, v).reshape(h.shape[0], -1)
    out = _linear(out, w["o"])
    return out + w["o_bias"] if "o_bias" in w else out


def _mask(n: int, window: int | None) -> np.ndarray:
    """(n, n) bool: query q sees key k when k <= q and, with a window, q - k < window (as HF's overlay)."""
    q, k = np.arange(n)[:, None], np.arange(n)[None, :]
    allowed = k <= q
    return allowed & (q - k < window) if window else allowed


def _mlp(model: Model, w: Mapping[str, np.ndarray], h: np.ndarray) -> np.ndarray:
    """Gated MLP: down(act(gate(h)) * up(h))."""
    if "gate_up" in w:
        gate, up = np.split(_linear(h, w["gate_up"]), 2, axis=-1)
    else:
        gate, up = _linear(h, w["gate"]), _linear(h, w["up"])
    act_name = model.config[model.arch.act_key]
    if act_name not in ACTIVATIONS:
        raise CheckpointError(path=str(model.path), problem=f"activation {act_name!r} is not implemented "
                                                            f"(known: {sorted(ACTIVATIONS)})")
    return _linear(ACTIVATIONS[act_name](gate) * up, w["down"])


def _block(model: Model, i: int, x: np.ndarray) -> np.ndarray:
    """One decoder layer on the residual stream x (n_tokens, hidden); optional post-norms as in Gemma 2/3."""
    w = model.layer(i)
    eps, offset = model.config["rms_norm_eps"], model.arch.norm_offset
    out = _attention(model, i, w, _rms_norm(x, w["attn_norm"], eps, offset))
    if "attn_post_norm" in w:
        out = _rms_norm(out, w["attn_post_norm"], eps, offset)
    x = x + out
    out = _mlp(model, w, _rms_norm(x, w["ffn_norm"], eps, offset))
    if "ffn_post_norm" in w:
        out = _rms_norm(out, w["ffn_post_norm"], eps, offset)
    return x + out


def _embed(model: Model, token_ids: np.ndarray) -> np.ndarray:
    name = model.prefix + "embed_tokens.weight"
    table = model.files[name]
    rows = table.raw(name)[token_ids]                    # copies only the rows asked for
    x = (bf16_to_f32(rows) if table.infos[name].dtype == "BF16" else rows).astype(np.float64)
    return x * math.sqrt(model.config["hidden_size"]) if model.arch.embed_scale else x


def _logits(model: Model, h: np.ndarray) -> np.ndarray:
    """h (n_tokens, hidden) times the output head, widened LOGIT_CHUNK rows at a time -> (n_tokens, vocab)."""
    f = model.files[model.head]
    info = f.infos[model.head]
    out = np.empty((h.shape[0], info.shape[0]), dtype=np.float64)
    for start in range(0, info.shape[0], LOGIT_CHUNK):
        rows = f.raw(model.head)[start:start + LOGIT_CHUNK]          # a view: only this chunk is widened
        rows = bf16_to_f32(rows) if info.dtype == "BF16" else rows
        out[:, start:start + LOGIT_CHUNK] = _linear(h, rows)
    cap = model.config.get("final_logit_softcapping")
    return np.tanh(out / cap) * cap if cap else out


def forward(model_dir: str | Path, token_ids, *, return_hidden: bool = False):
    """Logits (n_tokens, vocab) float32 of the checkpoint in ``model_dir`` for ``token_ids`` (positions 0..n-1).

    With ``return_hidden=True`` returns ``(logits, hidden)`` where hidden is a list of n_layers + 1 float32
    arrays (n_tokens, hidden_size): the (scaled) embeddings, then the residual stream after each layer (before
    the final norm; HF's last hidden state is the normed one). Raises CheckpointError or UnsupportedArchitectureError when the checkpoint cannot be computed.
    """
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    model = load(model_dir)
    try:
        vocab = model.files[model.prefix + "embed_tokens.weight"].infos[model.prefix + "embed_tokens.weight"].shape[0]
        if ids.size == 0 or ids.min() < 0 or ids.max() >= vocab:
            raise CheckpointError(path=str(model.path), problem=f"token ids must be in [0, {vocab}), got "
                                                                f"{ids.tolist()[:8]}...")
        x = _embed(model, ids)
        hidden = [x.astype(np.float32)]
        for i in range(model.config["num_hidden_layers"]):
            x = _block(model, i, x)
            hidden.append(x.astype(np.float32))
        final = _rms_norm(x, model.tensor(model.prefix + "norm.weight"), model.config["rms_norm_eps"],
                          model.arch.norm_offset)
        logits = _logits(model, final).astype(np.float32)
    finally:
        model.close()
    return (logits, hidden) if return_hidden else logits
