"""What the planner knows about a model: its shape, its tensors and (when llama.cpp was asked) the exact
per-tensor types of each quantization recipe. Pure data; ``edgellm.fitting.inspect`` fills it from files.

Shapes follow llama.cpp, not the HF config: the KV cache llama.cpp allocates is what costs memory. For
example llama.cpp runs Mistral, Qwen2 and Phi-3 without their sliding window (full-size cache on every
layer) and Gemma 3 with one (``LLAMA_CPP_SWA``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from math import prod
from typing import Any, Mapping

from edgellm.converters.quant_types import GGML_TYPES
from edgellm.converters.spec import ModelSpec

# ggml type -> (weights per block, bytes per block) for the float types quant_types does not list as
# override targets but sources hold (gguf-py GGML_QUANT_SIZES has them all; these three are enough here).
_FLOAT_BLOCKS = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2)}

# gguf architecture -> the sliding-window pattern llama.cpp applies when the file names a window and no
# pattern (src/models/gemma3.cpp: load_swa_pattern(ml, 6)). Architectures not listed run every layer with
# a full-size cache in llama.cpp @0c1e57098 even when their config has a window (phi3.cpp disables it).
LLAMA_CPP_SWA: dict[str, int] = {"gemma3": 6, "gemma2": 2, "cohere2": 4}

# GGUF tokenizer.ggml.model values: "llama" is SentencePiece, "gpt2" byte-level BPE (holds merges too).
TOKENIZER_MODELS = ("llama", "gpt2")

_LAYER = re.compile(r"^blk\.(\d+)\.")


def block_layout(ggml_type: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml type."""
    if ggml_type in _FLOAT_BLOCKS:
        return _FLOAT_BLOCKS[ggml_type]
    t = GGML_TYPES[ggml_type]
    return t.block_size, t.type_size


def tensor_bytes(ne: tuple[int, ...], ggml_type: str) -> int:
    """Exact bytes of a tensor of element shape ``ne`` (ggml order) stored as ``ggml_type``."""
    block, size = block_layout(ggml_type)
    return prod(ne) // block * size


@dataclass(frozen=True)
class TensorFact:
    """One GGUF tensor: name, element shape in ggml order (``ne[0]`` is the row length) and stored type."""

    name: str
    ne: tuple[int, ...]
    type: str                     # ggml spelling in the source ("BF16" for a HF checkpoint read as such)

    @property
    def n_elements(self) -> int:
        return prod(self.ne)

    @property
    def layer(self) -> int | None:
        """The block index of a ``blk.N.*`` tensor, None for global tensors (token_embd, output...)."""
        match = _LAYER.match(self.name)
        return int(match[1]) if match else None

    def bytes_as(self, ggml_type: str) -> int:
        return tensor_bytes(self.ne, ggml_type)


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide memory and speed, as llama.cpp sees them. Lengths in elements."""

    architecture: str             # gguf architecture name ("gemma3", "llama", "qwen2", ...)
    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_kv_head: int
    head_dim: int                 # K head length
    head_dim_v: int               # V head length
    vocab_size: int
    context_length: int           # trained maximum
    sliding_window: int | None    # None when llama.cpp runs no layer with a window
    swa_layers: tuple[bool, ...]  # per layer: llama.cpp caches only the window there
    tied_embeddings: bool
    tokenizer_model: str = "llama"   # one of TOKENIZER_MODELS
    n_merges: int = 0                # BPE merges llama.cpp keeps in memory

    @property
    def n_embd_k_gqa(self) -> int:
        return self.n_kv_head * self.head_dim

    @property
    def n_embd_v_gqa(self) -> int:
        return self.n_kv_head * self.head_dim_v

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def n_swa_layers(self) -> int:
        return sum(self.swa_layers)


@dataclass(frozen=True)
class ModelFacts:
    """Everything the pure planner reads about the model.

    ``recipes`` maps a llama.cpp file type ("Q4_K_M") to the ggml type llama.cpp gives each tensor (from a
    quantizer dry run at the I/O edge); file types missing there are sized with ``quant.approximate_recipe``.
    ``measured_kld`` holds KL divergences measured on calibration text (``--measure-quality``), by candidate;
    ``predicted_kld`` the mixed candidates' KLD as the loss model fitted to measured sensitivity prices them
    (``recipes`` then also holds their exact allocation under the candidate's label).
    """

    name: str                     # display name ("gemma-3-270m")
    source: str                   # the path the user gave
    source_format: str            # "hf" or "gguf"
    source_type: str              # "BF16"/"F16"/"F32" for a checkpoint, the file type ("Q4_K_M") for a GGUF
    shape: ModelShape
    tensors: tuple[TensorFact, ...]
    recipes: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    measured_kld: Mapping[str, float] = field(default_factory=dict)
    predicted_kld: Mapping[str, float] = field(default_factory=dict)   # mixed candidates: measured loss model
    prunings: tuple[Any, ...] = ()  # ``prune.Pruning``s measured for --allow-prune (blocks dropped, their KLD)
    notes: tuple[str, ...] = ()   # facts worth showing (e.g. a window llama.cpp ignores)

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def source_bytes(self) -> int:
        """Tensor data bytes of the source as stored."""
        return sum(t.bytes_as(t.type) for t in self.tensors)


# ----------------------------------------------------------------------------------------- derivations

def swa_flags(architecture: str, n_layers: int, window: int | None, pattern: Any = None) -> tuple[bool, ...]:
    """Which layers llama.cpp gives a window-sized cache (llama_hparams::set_swa_pattern, dense_first false).

    ``pattern``: the file's ``attention.sliding_window_pattern`` (an int n: every n-th layer is global, or a
    per-layer list of bools), None for the architecture's default.
    """
    if not window or architecture not in LLAMA_CPP_SWA:
        return (False,) * n_layers
    if isinstance(pattern, (list, tuple)) and len(pattern) == n_layers:
        return tuple(bool(p) for p in pattern)
    n = int(pattern) if isinstance(pattern, int) and pattern >= 0 else LLAMA_CPP_SWA[architecture]
    return tuple(n == 0 or i % n < n - 1 for i in range(n_layers))


def shape_from_spec(spec: ModelSpec, architecture: str, *, tokenizer_model: str = "llama",
                    n_merges: int = 0) -> ModelShape:
    """The llama.cpp view of an HF ``ModelSpec`` (``architecture`` is the GGUF name the converter writes)."""
    window = spec.sliding_window if architecture in LLAMA_CPP_SWA else None
    flags = spec.swa_layers if window else (False,) * spec.n_layers
    return ModelShape(architecture=architecture, n_layers=spec.n_layers, n_embd=spec.n_embd, n_ff=spec.n_ff,
                      n_head=spec.n_head, n_kv_head=spec.n_kv_head, head_dim=spec.head_dim,
                      head_dim_v=spec.head_dim, vocab_size=spec.vocab_size, context_length=spec.context_length,
                      sliding_window=window, swa_layers=tuple(flags), tied_embeddings=spec.tie_embeddings,
                      tokenizer_model=tokenizer_model, n_merges=n_merges)


def _meta(meta: Mapping[str, Any], arch: str, key: str, default: Any = None) -> Any:
    return meta.get(f"{arch}.{key}", default)


def shape_from_gguf(meta: Mapping[str, Any], n_vocab: int, n_merges: int = 0,
                    has_output: bool = True) -> ModelShape:
    """The shape of a GGUF file from its metadata (``n_vocab``: length of tokenizer.ggml.tokens).

    Raises KeyError naming a required key the metadata lacks.
    """
    arch = str(meta["general.architecture"])
    need = lambda key: meta[f"{arch}.{key}"]   # noqa: E731 - KeyError names the key
    n_layers, n_embd, n_head = int(need("block_count")), int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_meta(meta, arch, "attention.key_length", n_embd // n_head))
    window = _meta(meta, arch, "attention.sliding_window")
    flags = swa_flags(arch, n_layers, window, _meta(meta, arch, "attention.sliding_window_pattern"))
    return ModelShape(
        architecture=arch, n_layers=n_layers, n_embd=n_embd, n_ff=int(need("feed_forward_length")),
        n_head=n_head, n_kv_head=int(_meta(meta, arch, "attention.head_count_kv", n_head)), head_dim=head_dim,
        head_dim_v=int(_meta(meta, arch, "attention.value_length", head_dim)), vocab_size=n_vocab,
        context_length=int(need("context_length")), sliding_window=int(window) if any(flags) else None,
        swa_layers=flags, tied_embeddings=not has_output,
        tokenizer_model=str(meta.get("tokenizer.ggml.model", "llama")), n_merges=n_merges)


# (name pattern, ne as a function of the shape) for a Llama-style block; Gemma 3 adds per-head Q/K norms
# and sandwich norms (``_EXTRA``). Used to describe a model without files (tests, what-if planning).
_GLOBAL = (
    ("token_embd.weight", lambda s: (s.n_embd, s.vocab_size)),
    ("output_norm.weight", lambda s: (s.n_embd,)),
)
_BLOCK = (
    ("attn_norm.weight", lambda s: (s.n_embd,)),
    ("attn_q.weight", lambda s: (s.n_embd, s.q_dim)),
    ("attn_k.weight", lambda s: (s.n_embd, s.n_embd_k_gqa)),
    ("attn_v.weight", lambda s: (s.n_embd, s.n_embd_v_gqa)),
    ("attn_output.weight", lambda s: (s.q_dim, s.n_embd)),
    ("ffn_norm.weight", lambda s: (s.n_embd,)),
    ("ffn_gate.weight", lambda s: (s.n_embd, s.n_ff)),
    ("ffn_up.weight", lambda s: (s.n_embd, s.n_ff)),
    ("ffn_down.weight", lambda s: (s.n_ff, s.n_embd)),
)
_EXTRA = {
    "gemma3": (("attn_q_norm.weight", lambda s: (s.head_dim,)), ("attn_k_norm.weight", lambda s: (s.head_dim,)),
               ("post_attention_norm.weight", lambda s: (s.n_embd,)), ("post_ffw_norm.weight", lambda s: (s.n_embd,))),
}


def synthetic_tensors(shape: ModelShape, weight_type: str = "BF16") -> tuple[TensorFact, ...]:
    """The tensors a standard decoder of ``shape`` has (1-D norms in F32, matrices in ``weight_type``)."""
    def fact(name: str, ne: tuple[int, ...]) -> TensorFact:
        return TensorFact(name, ne, "F32" if len(ne) == 1 else weight_type)

    tensors = [fact(name, ne(shape)) for name, ne in _GLOBAL]
    if not shape.tied_embeddings:
        tensors.append(fact("output.weight", (shape.n_embd, shape.vocab_size)))
    rows = _BLOCK + _EXTRA.get(shape.architecture, ())
    for i in range(shape.n_layers):
        tensors += [fact(f"blk.{i}.{name}", ne(shape)) for name, ne in rows]
    return tuple(tensors)


def facts_from_shape(shape: ModelShape, name: str, *, weight_type: str = "BF16", source: str = "") -> ModelFacts:
    """Facts for a model known only by its shape (no files): synthetic tensors, approximate recipes."""
    return ModelFacts(name=name, source=source or name, source_format="hf", source_type=weight_type, shape=shape,
                      tensors=synthetic_tensors(shape, weight_type))
