"""Memory model: the peak resident memory of the edgellm runtime running a model with given settings. Pure.

Every term follows what llama.cpp @0c1e57098 allocates (cited per function) plus what the Python runtime
adds, so the total predicts the process's peak RSS while generating:

    total = runtime + weights + repack + vocab + KV cache + compute (touched) + output + context + sampling

on one pool (CPU, unified memory) or split over host and GPU memory (discrete GPU: ``split_layers``).
Constants measured on this project's machine say so and where; ``benchmarks/fit_accuracy.py`` re-measures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edgellm.fitting.facts import ModelShape, TensorFact, block_layout
from edgellm.fitting.quant import Recipe, repacked_bytes

MiB = 1 << 20
F32 = 4                      # bytes per float the graph computes in
MASK_BYTES = {True: 2, False: 4}   # KQ mask element: f16 with flash attention, f32 without (llama-graph.cpp)
CTX_PAD = 256                # llama-context.cpp: cparams.n_ctx = GGML_PAD(n_ctx, 256)
SWA_PAD = 256                # llama-kv-cache-iswa.cpp: the SWA cache is padded to 256 cells

# KV cache element types the runtime accepts (edgellm.runtime.llamacpp.KV_TYPES) -> ggml type name
KV_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q5_1": "Q5_1", "q5_0": "Q5_0",
            "q4_1": "Q4_1", "q4_0": "Q4_0", "iq4_nl": "IQ4_NL"}

# --- compute buffer model (CPU backend), fitted to llama.cpp's reported "CPU compute buffer size" for
# Gemma 3 270M and tiny llama/qwen3/gemma3/phi3 shapes (n_ubatch 32..2048, n_ctx 512..16384, flash attention
# on and off). The masks (inputs) live through the whole graph; at a layer's peak either the FFN keeps about
# 4 FFN-wide and 2 model-wide rows per token alive, or, without flash attention, attention keeps the
# (n_kv x n_head) scores plus about 4 query-wide rows; the output step keeps the logits rows, their normed
# inputs and the residual stream of the ubatch.
FFN_ROWS = 4                 # n_ff-wide f32 rows live per ubatch token at a layer's peak (gate, up, act, product)
EMBD_ROWS = 2                # n_embd-wide rows alongside (residual and normed input)
QUERY_ROWS = 4               # q-wide rows alongside the scores without flash attention (Q, KQV, merged, out)
# The runtime turns flash attention on only for quantized caches (runtime/llamacpp.py context_params).
FLOAT_KV = frozenset({"f32", "f16", "bf16"})

# --- runtime terms measured here (2-core x86_64, Python 3.12, llama-cpp-python 0.3.36; fit_accuracy.py)
VOCAB_BYTES_PER_TOKEN = {"llama": 168, "gpt2": 168}   # llama_vocab: token text, scores, attrs, id maps, pieces
VOCAB_BYTES_PER_MERGE = 128  # BPE merge ranks (std::map of string pairs); structural estimate, not measured
CELL_META_BYTES = 64         # per KV cell per cache: positions, shifts and sequence bitsets (llama_kv_cells)
GRAPH_META_BYTES = 256 * 1024  # graph and scheduler metadata of a context
SAMPLING_BYTES_PER_TOKEN = 60  # numpy temporaries per vocabulary entry while sampling with top_p (measured: Gemma
                               # 262k vocab, 6 MiB greedy, 15 MiB at temperature 0.8 / top_p 0.95)


@dataclass(frozen=True)
class BackendMemory:
    """Fixed costs and placement rules of one inference backend (one row of ``BACKENDS``)."""

    runtime_bytes: int           # the Python runtime with numpy and the llama.cpp libraries, resident
    device_context_bytes: int    # GPU context, kernels and library workspaces (0 for the CPU)
    weights_copied: bool         # offloaded weights are copied into device buffers (not mapped from the file)
    repacks: bool                # CPU backend: interleaved copies of some weight types (quant.REPACK_RULES)
    sources: str = ""


# runtime_bytes: the edgellm runtime process (Python, numpy, jinja2, llama.cpp libraries, code pages touched
# while decoding), the peak RSS of a 2-layer model minus its model terms: 51-52 MiB on this machine
# (benchmarks/fit_accuracy.py; x86_64, Python 3.12). device_context_bytes: Ollama's per-device minimum (ml/device.go
# MinimumMemory: 457 MiB CUDA/ROCm, 512 MiB Metal), the figure peers use for a loaded GPU context.
RUNTIME_BYTES = 52 * MiB
BACKENDS: dict[str, BackendMemory] = {
    "llama.cpp-cpu": BackendMemory(RUNTIME_BYTES, 0, False, True, "measured here"),
    "llama.cpp-cuda": BackendMemory(RUNTIME_BYTES, 457 * MiB, True, False, "runtime measured here; GPU: Ollama MinimumMemory"),
    "llama.cpp-vulkan": BackendMemory(RUNTIME_BYTES, 457 * MiB, True, False, "runtime measured here; GPU: Ollama MinimumMemory"),
    "llama.cpp-metal": BackendMemory(RUNTIME_BYTES, 512 * MiB, False, False, "runtime measured here; GPU: Ollama MinimumMemory"),
}


def pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Settings:
    """The runtime settings that decide memory."""

    n_ctx: int
    n_batch: int = 512            # tokens per llama_decode call; the runtime sets n_ubatch = n_batch
    kv_type: str = "f16"
    n_outputs: int = 1            # logits rows per decode call while generating
    n_outputs_max: int = 32       # rows the runtime reserves (edgellm.runtime.llamacpp.MAX_OUTPUTS_PER_CALL)
    swa_full: bool = False        # the runtime keeps window-sized SWA caches (runtime/llamacpp.py context_params)
    flash_attn: bool | None = None   # None: what the runtime does (on only for a quantized cache)

    @property
    def uses_flash_attn(self) -> bool:
        return self.kv_type not in FLOAT_KV if self.flash_attn is None else self.flash_attn
    n_gpu_layers: int = 0         # repeating layers on the GPU (-1: all, and the output layer)

    @property
    def n_ctx_padded(self) -> int:
        return pad(self.n_ctx, CTX_PAD)

    @property
    def n_ubatch(self) -> int:
        return min(self.n_batch, self.n_ctx)   # llama-context.cpp: n_batch = min(n_ctx, n_batch) for causal models


# ------------------------------------------------------------------------------------------------ KV cache

def swa_cells(shape: ModelShape, s: Settings) -> int:
    """Cells of a sliding-window layer's cache (llama_kv_cache_iswa: pad(min(n_ctx, n_swa + n_ubatch), 256))."""
    if s.swa_full or not shape.sliding_window:
        return s.n_ctx_padded
    return pad(min(s.n_ctx_padded, shape.sliding_window + s.n_ubatch), SWA_PAD)


def kv_cells(shape: ModelShape, s: Settings, layer: int) -> int:
    return swa_cells(shape, s) if shape.swa_layers[layer] else s.n_ctx_padded


def kv_row_bytes(shape: ModelShape, kv_type: str) -> int:
    """Bytes one cell holds in one layer: a K row and a V row of the cache type (ggml_row_size)."""
    block, size = block_layout(KV_TYPES[kv_type])
    return (shape.n_embd_k_gqa // block + shape.n_embd_v_gqa // block) * size


def kv_layer_bytes(shape: ModelShape, s: Settings, layer: int) -> int:
    return kv_cells(shape, s, layer) * kv_row_bytes(shape, s.kv_type)


def kv_bytes(shape: ModelShape, s: Settings, layers: range | None = None) -> int:
    """The KV cache of ``layers`` (all by default): cleared at creation, so all of it is resident."""
    return sum(kv_layer_bytes(shape, s, i) for i in (range(shape.n_layers) if layers is None else layers))


def kv_fits_type(shape: ModelShape, kv_type: str) -> bool:
    """Quantized caches need rows that split into whole blocks (llama.cpp refuses the context otherwise)."""
    block = block_layout(KV_TYPES[kv_type])[0]
    return shape.n_embd_k_gqa % block == 0 and shape.n_embd_v_gqa % block == 0


# ------------------------------------------------------------------------------------------ compute buffer

def kv_spans(shape: ModelShape, s: Settings) -> tuple[int, int]:
    """(cells the full-context mask spans, cells the SWA mask spans); 0 where no layer of that kind exists."""
    global_kv = s.n_ctx_padded if shape.n_swa_layers < shape.n_layers else 0
    window_kv = swa_cells(shape, s) if shape.n_swa_layers else 0
    return global_kv, window_kv


def mask_bytes(shape: ModelShape, s: Settings) -> int:
    """KQ masks of a ubatch: one over the full cache, one over the SWA cache when some layer slides."""
    return s.n_ubatch * sum(kv_spans(shape, s)) * MASK_BYTES[s.uses_flash_attn]


def layer_phase_bytes(shape: ModelShape, s: Settings) -> int:
    ffn = FFN_ROWS * max(shape.n_ff, shape.q_dim) + EMBD_ROWS * shape.n_embd
    attn = 0
    if not s.uses_flash_attn:     # the scores of every head over every cell, materialized in f32
        attn = max(kv_spans(shape, s)) * shape.n_head + QUERY_ROWS * shape.q_dim + EMBD_ROWS * shape.n_embd \
            + shape.n_embd_k_gqa
    return s.n_ubatch * max(ffn, attn) * F32 + mask_bytes(shape, s)


def output_phase_bytes(shape: ModelShape, s: Settings, n_outputs: int) -> int:
    rows = min(n_outputs, s.n_ubatch)
    return F32 * (rows * (shape.vocab_size + 2 * shape.n_embd) + s.n_ubatch * 2 * shape.n_embd)


def work_bytes(shape: ModelShape, s: Settings) -> int:
    """The CPU backend's work buffer (ggml-cpu graph_compute: the largest matmul operand converted to the
    kernel's type). Without flash attention that is the scores, converted to f16 for the product with V;
    with it, an activation row block converted for the weight kernels."""
    if s.uses_flash_attn:
        return s.n_ubatch * max(shape.n_ff, shape.q_dim, shape.n_embd) * 2
    return s.n_ubatch * max(kv_spans(shape, s)) * shape.n_head * 2


def compute_bytes(shape: ModelShape, s: Settings, *, reserved: bool = False) -> int:
    """The compute buffer: reserved (what llama.cpp allocates for n_outputs_max rows) or touched while
    generating with ``s.n_outputs`` rows per call (what becomes resident). Excludes the work buffer."""
    rows = s.n_outputs_max if reserved else s.n_outputs
    return max(layer_phase_bytes(shape, s), output_phase_bytes(shape, s, rows))


def output_bytes(shape: ModelShape, s: Settings) -> int:
    """Host logits buffer (llama_context::output_reserve: n_vocab floats per output row)."""
    return shape.vocab_size * F32 * max(s.n_outputs, 1)


# ------------------------------------------------------------------------------------------ the rest

def vocab_bytes(shape: ModelShape) -> int:
    return shape.vocab_size * VOCAB_BYTES_PER_TOKEN.get(shape.tokenizer_model, 168) + shape.n_merges * VOCAB_BYTES_PER_MERGE


def context_meta_bytes(shape: ModelShape, s: Settings) -> int:
    caches = 1 + (1 if shape.n_swa_layers else 0)
    return GRAPH_META_BYTES + caches * s.n_ctx_padded * CELL_META_BYTES


def sampling_bytes(shape: ModelShape) -> int:
    return shape.vocab_size * SAMPLING_BYTES_PER_TOKEN


# ------------------------------------------------------------------------------------------ placement

def layer_weight_bytes(tensors: tuple[TensorFact, ...], types: Recipe) -> dict[int | None, int]:
    """Weight bytes per block index (None: global tensors)."""
    per: dict[int | None, int] = {}
    for t in tensors:
        per[t.layer] = per.get(t.layer, 0) + t.bytes_as(types[t.name])
    return per


def output_layer_bytes(tensors: tuple[TensorFact, ...], types: Recipe) -> tuple[int, int]:
    """(moved, duplicated) bytes of the output layer a GPU gets with all layers: output.weight and
    output_norm move; a tied embedding stays on the host for the input and is loaded again as the output
    (llama.cpp TENSOR_DUPLICATED), so its bytes are duplicated, not moved."""
    by_name = {t.name: t for t in tensors}
    norm = by_name.get("output_norm.weight")
    moved = norm.bytes_as(types[norm.name]) if norm else 0
    if "output.weight" in by_name:
        return moved + by_name["output.weight"].bytes_as(types["output.weight"]), 0
    embd = by_name.get("token_embd.weight")
    return moved, embd.bytes_as(types[embd.name]) if embd else 0


@dataclass(frozen=True)
class MemoryBreakdown:
    """Predicted bytes by component. ``total_bytes`` is the peak resident memory while generating."""

    weights_bytes: int            # tensor data of the model file (memory-mapped on the CPU)
    repack_bytes: int             # CPU backend's interleaved copies of some weights
    device_weights_bytes: int     # weights copied into GPU buffers (0 on the CPU, and with Metal's mapped buffers)
    kv_cache_bytes: int
    compute_bytes: int            # compute buffer pages touched while generating, plus the CPU work buffer
    compute_reserved_bytes: int   # compute buffer llama.cpp allocates (all touched by draft verification)
    output_bytes: int
    vocab_bytes: int
    context_bytes: int            # KV cell bookkeeping and graph metadata
    sampling_bytes: int
    runtime_bytes: int
    device_context_bytes: int
    host_bytes: int               # the part in host RAM
    device_bytes: int             # the part in dedicated GPU memory (0 with unified memory or no GPU)
    total_bytes: int
    n_gpu_layers: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["notes"] = list(self.notes)
        return data


@dataclass(frozen=True)
class Placement:
    """Where the model runs: the backend's memory row, whether memory is unified, and the GPU layer count."""

    backend: str
    unified: bool
    n_gpu_layers: int             # repeating layers offloaded (0 on the CPU)
    n_layers: int

    @property
    def offloads_output(self) -> bool:
        return self.n_gpu_layers >= self.n_layers > 0 and self.backend != "llama.cpp-cpu"


def estimate(shape: ModelShape, tensors: tuple[TensorFact, ...], types: Recipe, s: Settings,
             place: Placement, cpu_features: frozenset[str]) -> MemoryBreakdown:
    """Predict the memory of running ``tensors`` stored as ``types`` with settings ``s`` on ``place``."""
    row = BACKENDS[place.backend]
    weights = sum(t.bytes_as(types[t.name]) for t in tensors)
    gpu = place.n_gpu_layers if place.backend != "llama.cpp-cpu" else 0
    per_layer = layer_weight_bytes(tensors, types)
    moved, duplicated = output_layer_bytes(tensors, types) if place.offloads_output else (0, 0)
    moved += sum(per_layer.get(i, 0) for i in range(gpu))
    device_weights = moved + duplicated if row.weights_copied else 0
    repack = repacked_bytes(tensors, types, cpu_features) if row.repacks else 0
    kv_gpu = kv_bytes(shape, s, range(gpu))
    kv_all = kv_bytes(shape, s)
    compute = compute_bytes(shape, s) + work_bytes(shape, s)
    host_only = (row.runtime_bytes + vocab_bytes(shape) + output_bytes(shape, s) + context_meta_bytes(shape, s)
                 + sampling_bytes(shape) + repack)
    # Mapped weights stay in host RAM unless copied to the GPU; the host keeps token_embd (input layer) always.
    host_weights = weights - (moved if row.weights_copied else 0)
    device = device_weights + kv_gpu + (compute if gpu else 0) + (row.device_context_bytes if gpu else 0)
    host = host_only + host_weights + (kv_all - kv_gpu) + (0 if gpu else compute)
    notes = _notes(place, row, device_weights)
    total = host + device
    return MemoryBreakdown(
        weights_bytes=weights, repack_bytes=repack, device_weights_bytes=device_weights, kv_cache_bytes=kv_all,
        compute_bytes=compute, compute_reserved_bytes=compute_bytes(shape, s, reserved=True),
        output_bytes=output_bytes(shape, s), vocab_bytes=vocab_bytes(shape), context_bytes=context_meta_bytes(shape, s),
        sampling_bytes=sampling_bytes(shape), runtime_bytes=row.runtime_bytes,
        device_context_bytes=row.device_context_bytes if gpu else 0,
        host_bytes=total if place.unified else host, device_bytes=0 if place.unified else device,
        total_bytes=total, n_gpu_layers=gpu, notes=notes)


def _notes(place: Placement, row: BackendMemory, copied: int) -> tuple[str, ...]:
    notes = []
    if place.unified and row.weights_copied and copied:
        notes.append("unified memory: offloaded weights are copied into GPU buffers, so the plan loads them "
                     "without mmap (no second copy in the page cache) and counts them once")
    return tuple(notes)
