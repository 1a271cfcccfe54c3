"""The memory model against what llama.cpp allocates (pure; the expected numbers are llama.cpp's own logs).

Figures marked "llama.cpp reported" were read from llama-cpp-python 0.3.36's log lines ("KV buffer size",
"CPU compute buffer size", "CPU_REPACK model buffer size") for the files named, with the runtime's context
settings (n_batch = n_ubatch, n_seq_max 1, flash attention auto).
"""

from __future__ import annotations

import dataclasses

import pytest

from edgellm.fitting import memory as m
from edgellm.fitting import quant
from edgellm.fitting.facts import ModelShape, TensorFact, swa_flags, synthetic_tensors

MiB = 1 << 20

GEMMA = ModelShape(architecture="gemma3", n_layers=18, n_embd=640, n_ff=2048, n_head=4, n_kv_head=1, head_dim=256,
                   head_dim_v=256, vocab_size=262144, context_length=32768, sliding_window=512,
                   swa_layers=swa_flags("gemma3", 18, 512), tied_embeddings=True)
LLAMA_TINY = ModelShape(architecture="llama", n_layers=2, n_embd=512, n_ff=2048, n_head=8, n_kv_head=4, head_dim=128,
                        head_dim_v=128, vocab_size=384, context_length=4096, sliding_window=None,
                        swa_layers=(False, False), tied_embeddings=False)
LLAMA_64 = dataclasses.replace(LLAMA_TINY, n_embd=64, n_ff=128, n_head=4, n_kv_head=2, head_dim=16, head_dim_v=16)


def test_gemma_swa_pattern_is_llama_cpps():
    # gemma3.cpp load_swa_pattern(ml, 6): every 6th layer (5, 11, 17) is global
    assert [i for i, s in enumerate(GEMMA.swa_layers) if not s] == [5, 11, 17]
    assert swa_flags("llama", 4, 4096) == (False,) * 4          # llama.cpp ignores Mistral's window
    assert swa_flags("phi3", 4, 2047) == (False,) * 4           # phi3.cpp disables SWA


@pytest.mark.parametrize("n_ctx, kv, swa_full, base_mib, swa_mib", [
    # llama.cpp reported for gemma-3-270m-q4_k_m.gguf: (non-SWA KV MiB, SWA KV MiB)
    (512, "f16", True, 1.50, 7.50),
    (2048, "f16", True, 6.00, 30.00),
    (2048, "f16", False, 6.00, 15.00),
    (8192, "f16", False, 24.00, 15.00),
    (2048, "q8_0", False, 3.19, 7.97),
    (8192, "q8_0", True, 12.75, 63.75),
])
def test_kv_cache_matches_llama_cpp(n_ctx, kv, swa_full, base_mib, swa_mib):
    s = m.Settings(n_ctx=n_ctx, kv_type=kv, swa_full=swa_full)
    base = sum(m.kv_layer_bytes(GEMMA, s, i) for i in range(18) if not GEMMA.swa_layers[i])
    swa = sum(m.kv_layer_bytes(GEMMA, s, i) for i in range(18) if GEMMA.swa_layers[i])
    assert base / MiB == pytest.approx(base_mib, abs=0.01)
    assert swa / MiB == pytest.approx(swa_mib, abs=0.01)


def test_swa_cells_follow_the_iswa_formula():
    s = m.Settings(n_ctx=8192, n_batch=512, swa_full=False)
    assert m.swa_cells(GEMMA, s) == 1024                        # pad(min(8192, 512 + 512), 256)
    assert m.swa_cells(GEMMA, dataclasses.replace(s, n_batch=100)) == 768   # pad(612, 256)
    assert m.swa_cells(GEMMA, dataclasses.replace(s, n_ctx=300)) == 512     # n_ctx padded to 512 first
    assert m.swa_cells(GEMMA, dataclasses.replace(s, swa_full=True)) == 8192


def test_context_is_padded_to_256():
    assert m.Settings(n_ctx=1000).n_ctx_padded == 1024
    assert m.kv_bytes(LLAMA_TINY, m.Settings(n_ctx=1000)) == 2 * 1024 * (512 + 512) * 2


@pytest.mark.parametrize("shape, n_ub, n_ctx, reported_mib", [
    # llama.cpp reported CPU compute buffer (n_outputs_max 1): Gemma 3 270M and a 2-layer llama of the same widths
    (GEMMA, 32, 512, 1.17), (GEMMA, 128, 4096, 6.44), (GEMMA, 512, 512, 18.77), (GEMMA, 512, 4096, 25.77),
    (GEMMA, 512, 16384, 49.77), (GEMMA, 2048, 4096, 103.08), (GEMMA, 2048, 16384, 199.08),
    (LLAMA_TINY, 64, 512, 2.19), (LLAMA_TINY, 512, 512, 17.51), (LLAMA_TINY, 512, 4096, 21.01),
])
def test_compute_buffer_bounds_llama_cpp(shape, n_ub, n_ctx, reported_mib):
    s = m.Settings(n_ctx=n_ctx, n_batch=n_ub, n_outputs_max=1, swa_full=True, flash_attn=True)   # as measured
    predicted = m.compute_bytes(shape, s, reserved=True) / MiB
    assert reported_mib <= predicted <= reported_mib * 1.08 + 0.5


@pytest.mark.parametrize("n_ub, n_ctx, n_outputs, reported_mib", [
    # llama.cpp reported, Gemma 3 270M with window-sized SWA caches (what the runtime creates)
    (128, 2048, 1, 5.13), (128, 16384, 1, 8.63), (128, 8192, 32, 32.78), (512, 2048, 1, 20.77),
    (512, 8192, 1, 26.77), (512, 16384, 1, 34.77), (512, 2048, 32, 34.16), (512, 16384, 32, 34.77),
])
def test_compute_buffer_with_window_sized_caches(n_ub, n_ctx, n_outputs, reported_mib):
    s = m.Settings(n_ctx=n_ctx, n_batch=n_ub, n_outputs_max=n_outputs, flash_attn=True)
    predicted = m.compute_bytes(GEMMA, s, reserved=True) / MiB
    assert reported_mib <= predicted <= reported_mib + 1.0


@pytest.mark.parametrize("shape, n_ub, n_ctx, reported_mib", [
    # llama.cpp reported without flash attention (what the runtime does with an f16 cache): the scores of
    # every head over every cell are materialized, so the buffer grows with n_ctx * n_ubatch * n_head
    (GEMMA, 128, 512, 4.94), (GEMMA, 128, 8192, 22.82), (GEMMA, 512, 2048, 31.76), (GEMMA, 512, 8192, 91.76),
    (LLAMA_64, 128, 512, 1.44), (LLAMA_64, 512, 2048, 20.76), (LLAMA_64, 512, 8192, 80.76),
])
def test_compute_buffer_without_flash_attention(shape, n_ub, n_ctx, reported_mib):
    s = m.Settings(n_ctx=n_ctx, n_batch=n_ub, n_outputs_max=1)
    assert not s.uses_flash_attn and m.Settings(n_ctx=512, kv_type="q8_0").uses_flash_attn
    predicted = m.compute_bytes(shape, s, reserved=True) / MiB
    assert reported_mib <= predicted <= reported_mib * 1.05 + 0.5


@pytest.mark.parametrize("n_ub, n_ctx, reported_mib", [(32, 4096, 32.16), (128, 512, 32.47), (512, 512, 33.41)])
def test_compute_buffer_reserves_the_logits_rows(n_ub, n_ctx, reported_mib):
    # n_outputs_max 32: 32 rows of Gemma's 262k logits dominate
    s = m.Settings(n_ctx=n_ctx, n_batch=n_ub, n_outputs_max=32, swa_full=True, flash_attn=True)
    predicted = m.compute_bytes(GEMMA, s, reserved=True) / MiB
    assert reported_mib <= predicted <= reported_mib + 1.5
    assert m.compute_bytes(GEMMA, s) < m.compute_bytes(GEMMA, s, reserved=True)   # generation touches 1 row


def test_repack_rules_follow_the_cpu():
    row = TensorFact("blk.0.attn_q.weight", (640, 1024), "Q4_K")
    odd = TensorFact("blk.0.attn_k.weight", (640, 12), "Q4_K")
    assert quant.is_repacked(row, "Q4_K", frozenset({"avx2"}))
    assert not quant.is_repacked(odd, "Q4_K", frozenset({"avx2"}))             # ne[1] % 8 != 0
    assert not quant.is_repacked(row, "Q4_K", frozenset({"sse3"}))
    assert not quant.is_repacked(row, "Q8_0", frozenset({"avx2"}))             # x86 keeps Q8_0 as is
    assert quant.is_repacked(row, "Q8_0", frozenset({"asimd", "dotprod"}))
    embd = TensorFact("token_embd.weight", (640, 262144), "Q8_0")
    assert not quant.is_repacked(embd, "Q8_0", frozenset({"asimd", "dotprod"}))
    assert quant.is_repacked(embd, "Q8_0", frozenset({"asimd", "dotprod"}), tied=True)   # duplicated as output


def _cpu(shape, s, types=None, features=frozenset({"avx2"})):
    tensors = synthetic_tensors(shape, "F16")
    types = types or {t.name: t.type for t in tensors}
    return m.estimate(shape, tensors, types, s, m.Placement("llama.cpp-cpu", False, 0, shape.n_layers), features)


def test_estimate_adds_up():
    b = _cpu(GEMMA, m.Settings(n_ctx=4096))
    parts = (b.weights_bytes + b.repack_bytes + b.kv_cache_bytes + b.compute_bytes + b.output_bytes + b.vocab_bytes
             + b.context_bytes + b.sampling_bytes + b.runtime_bytes)
    assert b.total_bytes == parts == b.host_bytes
    assert b.device_bytes == 0 and b.n_gpu_layers == 0
    assert b.vocab_bytes == 262144 * m.VOCAB_BYTES_PER_TOKEN["llama"]


def test_kv_grows_linearly_with_context():
    small, big = (_cpu(LLAMA_TINY, m.Settings(n_ctx=n)).kv_cache_bytes for n in (1024, 4096))
    assert big == 4 * small


def test_quantized_kv_needs_whole_blocks():
    assert m.kv_fits_type(GEMMA, "q8_0")
    odd = dataclasses.replace(LLAMA_TINY, head_dim=20, head_dim_v=20)
    assert not m.kv_fits_type(odd, "q4_0") and m.kv_fits_type(odd, "f16")


def test_unified_gpu_counts_copied_weights_once_and_the_tied_head_twice():
    tensors = synthetic_tensors(GEMMA, "F16")
    types = {t.name: t.type for t in tensors}
    s = m.Settings(n_ctx=2048)
    cpu = m.estimate(GEMMA, tensors, types, s, m.Placement("llama.cpp-cpu", True, 0, 18), frozenset())
    cuda = m.estimate(GEMMA, tensors, types, s, m.Placement("llama.cpp-cuda", True, 18, 18), frozenset())
    embd = next(t for t in tensors if t.name == "token_embd.weight").bytes_as("F16")
    # CUDA copies every layer and the output layer to the GPU; the tied embedding is loaded there again as
    # the output while the host keeps it for the input. Unified memory: one pool.
    assert m.output_layer_bytes(tensors, types) == (640 * 4, embd)
    assert cuda.device_weights_bytes == cpu.weights_bytes
    assert cuda.total_bytes - cpu.total_bytes == embd + m.BACKENDS["llama.cpp-cuda"].device_context_bytes
    assert cuda.device_bytes == 0 and cuda.host_bytes == cuda.total_bytes


def test_metal_maps_weights_without_copies():
    tensors = synthetic_tensors(GEMMA, "F16")
    types = {t.name: t.type for t in tensors}
    metal = m.estimate(GEMMA, tensors, types, m.Settings(n_ctx=2048), m.Placement("llama.cpp-metal", True, 18, 18),
                       frozenset())
    assert metal.device_weights_bytes == 0 and metal.repack_bytes == 0
