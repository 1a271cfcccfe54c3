"""ONNX candidates: what ``edgellm.converters.onnx.convert_onnx`` would write, and what ONNX Runtime needs to
run it (pure).

Weight bytes follow the converter's layout (converters/onnx/decoder.py, layers.py, quant.py): block-quantized
matrices are MatMulNBits codes ``(N, ceil(K / block), block * bits / 8)`` uint8 plus one scale per block in the
I/O dtype; float matrices, norms and biases are stored in the I/O (or float-weight) dtype; the embedding table
is quantized like the output projection when the provider runs GatherBlockQuantized, and a tied model gets a
second copy for the projection; RoPE cos/sin caches of ``(context, rope_dim / 2)`` are written per distinct
frequency set. Every tensor starts 64-byte aligned, large ones (1 MiB and up) 64 KiB aligned.

The KV cache is what the edgellm ONNX runtime allocates: with GroupQueryAttention one preallocated
``(1, kv_heads, n_ctx, head_dim)`` buffer per layer for K and for V in the graph's I/O dtype (no sliding-window
saving: ORT GenAI's shared buffer spans the whole context); standard-op graphs concatenate, so past and present
coexist (twice the cache). ONNX Runtime's own memory (session, arenas, prepacked MatMulNBits weights) is data
measured on this machine (``[[onnx_memory]]`` in edgellm/data/efficiency.toml).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Any, Mapping

from edgellm.backends import BACKENDS
from edgellm.fitting.facts import ModelFacts, ModelShape, TensorFact
from edgellm.targets.schema import DeviceProfile

PREFIX = "ONNX:"                        # Candidate.file_type of an ONNX candidate: "ONNX:int4"
# ONNX types worth offering per provider device, best quality first. fp16 on the CPU provider is cast back to
# fp32 node by node (converters/onnx/options.py) and fp32 on accelerators wastes their fp16 units.
TYPES_BY_DEVICE: dict[str, tuple[str, ...]] = {"cpu": ("fp32", "int8", "int4"), "gpu": ("fp16", "int8", "int4"),
                                               "npu": ("fp16", "int8", "int4")}
ITEMSIZE = {"float32": 4, "float16": 2}
CPU_BACKEND = "onnxruntime-cpu"         # the backend whose ONNX Runtime overhead was measured here
ALIGN_SMALL, ALIGN_LARGE, LARGE_TENSOR = 64, 1 << 16, 1 << 20   # converters/onnx/graph.py ExternalData
# architectures whose sliding layers rotate with their own base frequency (a second cos/sin cache pair)
LOCAL_ROPE_ARCHS = frozenset({"gemma3"})


def is_onnx(file_type: str) -> bool:
    return file_type.startswith(PREFIX)


def onnx_type(file_type: str) -> str:
    """"ONNX:int4" -> "int4"."""
    return file_type.removeprefix(PREFIX)


def onnx_backend(profile: DeviceProfile) -> str | None:
    """The profile's preferred ONNX Runtime backend, None when it lists none."""
    return next((b for b in profile.backends if BACKENDS[b].format == "onnx"), None)


def prefers_onnx(profile: DeviceProfile) -> bool:
    """Whether the profile's first backend is an ONNX Runtime provider (NPU profiles)."""
    return bool(profile.backends) and BACKENDS[profile.backends[0]].format == "onnx"


def candidate_types(backend: str) -> tuple[str, ...]:
    return TYPES_BY_DEVICE.get(BACKENDS[backend].device, TYPES_BY_DEVICE["cpu"])


def choices(onnx_kind: str, backend: str, n_ctx: int, trained: int) -> Any:
    """The converter's ``Choices`` for this type, provider and context (``converters.onnx.options.resolve``)."""
    from edgellm.converters.onnx.options import resolve

    return resolve(onnx_kind, BACKENDS[backend].api, context_length=n_ctx, trained_context=trained)


# ------------------------------------------------------------------------------------------- weights

def _quantized(ne: tuple[int, ...], bits: int, block: int, io_size: int, symmetric: bool) -> list[int]:
    """(codes, scales[, zero points]) bytes of a MatMulNBits weight of ggml shape ``ne`` (ne[0] = K)."""
    k, n = ne[0], prod(ne[1:])
    kb = -(-k // block)
    parts = [n * kb * block * bits // 8, n * kb * io_size]
    return parts + ([n * -(-kb * bits // 8)] if not symmetric else [])


def _float(t: TensorFact, size: int) -> list[int]:
    return [t.n_elements * size]


def tensor_parts(t: TensorFact, ch: Any, tied: bool) -> list[int]:
    """Bytes of the initializers the converter writes for GGUF tensor ``t`` (before alignment)."""
    io = ITEMSIZE[ch.io_dtype]
    if len(t.ne) < 2:
        return _float(t, io)
    if t.name in ("token_embd.weight", "output.weight"):
        out: list[int] = []
        if t.name == "token_embd.weight":
            out += (_quantized(t.ne, ch.embed_bits, ch.table_block_size, io, ch.symmetric) if ch.embed_bits
                    else _float(t, io))
        if t.name == "output.weight" or tied:
            shares = tied and ch.share_embeddings and ch.embed_bits and ch.embed_bits == ch.lm_head_bits
            if not shares:
                out += (_quantized(t.ne, ch.lm_head_bits, ch.table_block_size, io, ch.symmetric)
                        if ch.lm_head_bits else _float(t, io))
        return out
    bits = ch.precision.bits
    return _quantized(t.ne, bits, ch.block_size, io, ch.symmetric) if bits else _float(t, io)


def rope_bytes(shape: ModelShape, n_ctx: int, io_dtype: str) -> list[int]:
    """cos and sin caches (n_ctx, head_dim / 2) per distinct frequency set."""
    sets = 2 if shape.n_swa_layers and shape.architecture in LOCAL_ROPE_ARCHS else 1
    return [n_ctx * (shape.head_dim // 2) * ITEMSIZE[io_dtype]] * (2 * sets)


# The order the converter writes a block's initializers in (converters/onnx/decoder.py _layer/_attention/_mlp),
# by GGUF tensor name; stacked matrices (Q/K/V, gate/up) are one initializer per part. "rope": the cos/sin
# caches, written where the first layer of their frequency set needs them. Alignment depends on this order.
BLOCK_ORDER = ("attn_norm.weight", "qkv", "qkv_bias", "attn_q_norm.weight", "attn_k_norm.weight", "rope",
               "attn_output.weight", "attn_output.bias", "post_attention_norm.weight", "ffn_norm.weight", "gate_up",
               "ffn_down.weight", "post_ffw_norm.weight")
STACKED = {"attn_q.weight": "qkv", "attn_k.weight": "qkv", "attn_v.weight": "qkv", "attn_qkv.weight": "qkv",
           "attn_q.bias": "qkv_bias", "attn_k.bias": "qkv_bias", "attn_v.bias": "qkv_bias",
           "ffn_gate.weight": "gate_up", "ffn_up.weight": "gate_up"}


def _stack(a: list[int] | None, b: list[int]) -> list[int]:
    return b if a is None else [x + y for x, y in zip(a, b)]


def _layer_initializers(facts: ModelFacts, ch: Any, n_ctx: int) -> list[list[int]]:
    """Per block, its initializer sizes in write order (the RoPE caches at the first block of their set)."""
    tied, shape = facts.shape.tied_embeddings, facts.shape
    blocks: list[dict[str, list[int]]] = [{} for _ in range(shape.n_layers)]
    for t in facts.tensors:
        if t.layer is not None:
            role = t.name.split(".", 2)[2]
            slot = STACKED.get(role, role)
            blocks[t.layer][slot] = _stack(blocks[t.layer].get(slot), tensor_parts(t, ch, tied))
    seen, out = set(), []
    for i, block in enumerate(blocks):
        rope_set = bool(shape.swa_layers[i]) and shape.architecture in LOCAL_ROPE_ARCHS
        if rope_set not in seen:
            seen.add(rope_set)
            block["rope"] = rope_bytes(shape, n_ctx, ch.io_dtype)[:2]
        order = [k for k in BLOCK_ORDER if k in block] + [k for k in block if k not in BLOCK_ORDER]
        out.append([p for k in order for p in block[k]])
    return out


def weight_bytes(facts: ModelFacts, ch: Any, n_ctx: int) -> int:
    """Bytes of model.onnx.data for ``facts`` exported with ``ch``: initializers in the converter's order,
    each starting 64-byte aligned, 64 KiB when 1 MiB or larger (converters/onnx/graph.py ExternalData)."""
    tied = facts.shape.tied_embeddings
    by_name = {t.name: t for t in facts.tensors}
    sizes = tensor_parts(by_name["token_embd.weight"], ch, False) if "token_embd.weight" in by_name else []
    sizes += [p for block in _layer_initializers(facts, ch, n_ctx) for p in block]
    for name in ("output_norm.weight", "output.weight"):
        sizes += tensor_parts(by_name[name], ch, False) if name in by_name else []
    if tied and "token_embd.weight" in by_name:      # the output projection's copy of the table, last
        table = tensor_parts(by_name["token_embd.weight"], ch, False)
        sizes += tensor_parts(by_name["token_embd.weight"], ch, True)[len(table):]
    known = {"token_embd.weight", "output_norm.weight", "output.weight"}
    sizes += [p for t in facts.tensors if t.layer is None and t.name not in known for p in tensor_parts(t, ch, tied)]
    offset = 0
    for n in sizes:
        align = ALIGN_LARGE if n >= LARGE_TENSOR else ALIGN_SMALL
        offset += -offset % align + n
    return offset


def kv_bytes(shape: ModelShape, n_ctx: int, io_dtype: str, shared_buffer: bool) -> int:
    """K and V caches the runtime holds at ``n_ctx`` (twice when past and present are separate tensors)."""
    per_layer = n_ctx * (shape.n_embd_k_gqa + shape.n_embd_v_gqa) * ITEMSIZE[io_dtype]   # (1, kv_heads, n_ctx, head_dim) x2
    return shape.n_layers * per_layer * (1 if shared_buffer else 2)


# ------------------------------------------------------------------------------------------- runtime memory

@dataclass(frozen=True)
class OrtMemory:
    """ONNX Runtime's peak memory as a function of weights and KV cache, measured per backend (efficiency.toml):
    ``runtime_bytes + weights_share * weight file + kv_share * KV cache + per_vocab_bytes * vocabulary``."""

    backend: str
    runtime_bytes: int            # process, Python, ONNX Runtime libraries and session (a tiny model's peak)
    weights_share: float          # peak bytes per byte of the weight file (mapped pages and prepacked copies)
    kv_share: float               # share of the preallocated KV buffers resident at the peak
    per_vocab_bytes: int          # logits and sampling buffers per vocabulary entry
    source: str = ""


def ort_memory_from_dict(rows: Any) -> dict[str, OrtMemory]:
    """OrtMemory rows by backend from the ``[[onnx_memory]]`` array (TypeError on an unknown key)."""
    return {str(r["backend"]): OrtMemory(**r) for r in rows}


def logits_bytes(shape: ModelShape, row: OrtMemory) -> int:
    return shape.vocab_size * row.per_vocab_bytes


def memory_parts(facts: ModelFacts, ch: Any, n_ctx: int, row: OrtMemory) -> Mapping[str, int]:
    """Predicted resident bytes by component at the peak of a generation (``file_weights``: the file's size)."""
    weights = weight_bytes(facts, ch, n_ctx)
    resident = int(weights * row.weights_share)
    return {"weights": min(resident, weights), "repack": max(resident - weights, 0),
            "kv": int(kv_bytes(facts.shape, n_ctx, ch.io_dtype, ch.provider.gqa) * row.kv_share),
            "output": logits_bytes(facts.shape, row), "runtime": row.runtime_bytes, "file_weights": weights}


def memory_row(rows: Mapping[str, OrtMemory], backend: str) -> tuple[OrtMemory, str | None]:
    """The measured row for ``backend``, else the CPU provider's with a note saying so."""
    if backend in rows:
        return rows[backend], None
    return rows[CPU_BACKEND], f"{backend}: ONNX Runtime overhead not measured, the CPU provider's is used"



def breakdown(facts: ModelFacts, ch: Any, n_ctx: int, row: OrtMemory, notes: tuple[str, ...] = ()) -> Any:
    """A ``memory.MemoryBreakdown`` for an ONNX candidate (everything in host or unified memory)."""
    from edgellm.fitting.memory import MemoryBreakdown

    parts = memory_parts(facts, ch, n_ctx, row)
    total = parts["weights"] + parts["repack"] + parts["kv"] + parts["output"] + parts["runtime"]
    return MemoryBreakdown(weights_bytes=parts["file_weights"], repack_bytes=parts["repack"], device_weights_bytes=0,
                           kv_cache_bytes=parts["kv"], compute_bytes=0, compute_reserved_bytes=0,
                           output_bytes=parts["output"], vocab_bytes=0, context_bytes=0, sampling_bytes=0,
                           runtime_bytes=parts["runtime"], device_context_bytes=0, host_bytes=total,
                           device_bytes=0, total_bytes=total,
                           notes=notes + (f"ONNX Runtime's peak: {row.weights_share:.2f} x the weight file, "
                                          f"{row.kv_share:.2f} x the KV buffers, plus "
                                          f"{row.runtime_bytes / 2**20:.0f} MiB ({row.source})",))


# ------------------------------------------------------------------------------------------- speed

def read_per_token(facts: ModelFacts, ch: Any) -> tuple[int, int]:
    """(bytes, weights) a decoded token reads: every matrix once, the input table only one row (a tied model's
    output projection is its own copy, read in full), no RoPE cache rows worth counting."""
    tied, total, n = facts.shape.tied_embeddings, 0, 0
    for t in facts.tensors:
        parts = tensor_parts(t, ch, tied)
        if t.name == "token_embd.weight":
            table = 1 if not ch.embed_bits else (3 if not ch.symmetric else 2)   # the input table's initializers
            parts = parts[table:]
            n += t.n_elements if parts else 0
        else:
            n += t.n_elements
        total += sum(parts)
    return total, n


def estimate_speed(facts: ModelFacts, ch: Any, n_ctx: int, profile: DeviceProfile, backend: str, threads: int,
                   tables: Any) -> Any:
    """Decode (short and full context) and prefill speed of an ONNX candidate: bytes read per token at the
    backend's effective bandwidth plus fixed costs per token and per vocabulary entry (efficiency.toml rows
    for onnxruntime-*); prefill a compute roofline like llama.cpp's."""
    from edgellm.fitting.speed import FLOP_PER_WEIGHT, SpeedEstimate, device_facts, gpu_bandwidth, peak_flops

    eff = tables.row(backend, profile.device_class)
    dev = device_facts(profile, threads)
    gpu = BACKENDS[backend].device == "gpu"
    bandwidth = (gpu_bandwidth(profile) if gpu else profile.memory.bandwidth) * eff.bandwidth
    nbytes, n_weights = read_per_token(facts, ch)
    fixed = eff.per_token_s + facts.shape.vocab_size * eff.per_vocab_s
    kv_row = (facts.shape.n_embd_k_gqa + facts.shape.n_embd_v_gqa) * ITEMSIZE[ch.io_dtype] * facts.shape.n_layers

    def rate(depth: int) -> float:
        return 1.0 / (nbytes / bandwidth + depth * kv_row / bandwidth + fixed)

    flops = peak_flops(profile, dev, tables, gpu) * eff.prefill
    return SpeedEstimate(decode_tokens_per_s=rate(1), decode_tokens_per_s_full=rate(n_ctx),
                         prefill_tokens_per_s=flops / (FLOP_PER_WEIGHT * max(n_weights, 1)), bytes_per_token=nbytes,
                         bound="overhead" if fixed > nbytes / bandwidth else "bandwidth",
                         basis=f"{eff.backend}/{eff.device_class}: {eff.bandwidth:.2f} of "
                               f"{bandwidth / eff.bandwidth / 1e9:.1f} GB/s ({eff.source or 'efficiency.toml'})")
