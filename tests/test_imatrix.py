"""Importance matrices: collected through llama.cpp's eval callback, checked against numpy, written in
llama-imatrix's GGUF (and legacy .dat) format, read back, and used by quantize_gguf."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from edgellm.converters import convert
from edgellm.converters.imatrix import (Imatrix, chunk_tokens, compute_imatrix, default_calibration_text,
                                        load_imatrix, take_tokens)
from edgellm.converters.quantize import quantize_gguf, read_gguf_header
from edgellm.errors import ImatrixError, ModelLoadError, UsageError

LLAMA_256 = dict(hidden_size=256, intermediate_size=512)
GEMMA_640 = dict(hidden_size=640, intermediate_size=512, head_dim=256, num_hidden_layers=2)
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
TEXT = default_calibration_text()[:3000]


@pytest.fixture(scope="session")
def llama_f16(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("im") / "llama-f16.gguf"
    convert(tiny_checkpoint("llama", **LLAMA_256), out, "f16")
    return out


@pytest.fixture(scope="session")
def llama_imatrix(llama_f16) -> Imatrix:
    """300 tokens in windows of 128 (BOS opens each window)."""
    return compute_imatrix(llama_f16, TEXT, n_ctx=128, max_tokens=300, n_threads=2)


def evaluated_tokens(gguf_path: Path, text: str, n_ctx: int, max_tokens: int) -> list[int]:
    """The token ids compute_imatrix evaluates, rebuilt with llama-cpp-python's own tokenizer."""
    vocab = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    tokens = vocab.tokenize(text.encode(), add_bos=False, special=False)
    bos = vocab.token_bos() if vocab._model.add_bos_token() else None
    return [t for window in take_tokens(chunk_tokens(tokens, n_ctx, bos), max_tokens) for t in window]


def rms_normed(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


# ------------------------------------------------------------------------------------------------ collection

def test_every_layer_matrix_is_collected_over_every_token(llama_f16, llama_imatrix):
    m = llama_imatrix
    assert m.n_tokens == 300 and (m.chunk_count, m.chunk_size) == (3, 128)
    assert sorted(m.sums) == sorted(f"blk.{i}.{w}.weight" for i in range(2) for w in MATRICES)
    widths = {t.name: t.ne[0] for t in read_gguf_header(llama_f16).tensors}
    for name, sums in m.sums.items():
        assert sums.shape == (1, widths[name]) and (sums > 0).all(), name
        assert m.counts[name].tolist() == [300.0], name
    assert not m.skipped and m.datasets == ["text"]
    np.testing.assert_array_equal(m.sums["blk.0.attn_q.weight"], m.sums["blk.0.attn_v.weight"])  # same input


def test_layer_0_sums_match_numpy(llama_f16, llama_imatrix):
    """attn_q of layer 0 multiplies rms_norm(embedding) * attn_norm: recompute its Σx² from the file."""
    reader = gguf.GGUFReader(llama_f16)
    weights = {t.name: np.array(t.data, dtype=np.float64) for t in reader.tensors}
    eps = float(reader.fields["llama.attention.layer_norm_rms_epsilon"].contents())
    tokens = evaluated_tokens(llama_f16, TEXT, 128, 300)
    x = rms_normed(weights["token_embd.weight"][tokens], weights["blk.0.attn_norm.weight"], eps)
    np.testing.assert_allclose(llama_imatrix.sums["blk.0.attn_q.weight"][0], (x * x).sum(0), rtol=2e-3)


def test_windows_open_with_bos_and_stop_at_max_tokens():
    windows = chunk_tokens(list(range(10)), 4, bos=99)
    assert windows == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8], [99, 9]]
    assert take_tokens(windows, 6) == [[99, 0, 1, 2], [99, 3]]
    assert chunk_tokens(list(range(5)), 4, bos=None) == [[0, 1, 2, 3], [4]]


def test_progress_and_token_budget(llama_f16):
    seen = []
    m = compute_imatrix(llama_f16, TEXT, n_ctx=64, max_tokens=70, progress=lambda d, t: seen.append((d, t)))
    assert m.n_tokens == 70 and m.chunk_count == 2
    assert seen[-1] == (70, 70) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_bad_inputs_are_refused(llama_f16, tmp_path):
    with pytest.raises(ImatrixError, match="no tokens"):
        compute_imatrix(llama_f16, "")
    with pytest.raises(UsageError, match="n_ctx 4"):
        compute_imatrix(llama_f16, TEXT, n_ctx=4)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ModelLoadError, match="bad GGUF version"):
        compute_imatrix(tmp_path / "junk.gguf", TEXT)


# ------------------------------------------------------------------------------------------------ files

def test_gguf_file_has_llama_imatrix_layout_and_round_trips(llama_imatrix, tmp_path):
    path = llama_imatrix.save(tmp_path / "m.imatrix.gguf")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in reader.fields
    assert reader.fields["imatrix.datasets"].contents() == ["text"]
    assert reader.fields["imatrix.chunk_count"].contents() == 3
    assert reader.fields["imatrix.chunk_size"].contents() == 128
    shapes = {t.name: (t.tensor_type.name, [int(n) for n in t.shape]) for t in reader.tensors}
    assert shapes["blk.0.ffn_down.weight.in_sum2"] == ("F32", [512, 1])   # ggml ne = [n_per_row, n_mat]
    assert shapes["blk.0.ffn_down.weight.counts"] == ("F32", [1, 1])
    back = load_imatrix(path)
    assert (back.n_tokens, back.chunk_count, back.chunk_size, back.datasets) == (300, 3, 128, ["text"])
    for name in llama_imatrix.sums:
        np.testing.assert_array_equal(back.sums[name], llama_imatrix.sums[name])
        np.testing.assert_array_equal(back.counts[name], llama_imatrix.counts[name])
    assert not list(tmp_path.glob("*.partial"))


def test_legacy_dat_round_trips_the_mean_squares(llama_imatrix, tmp_path):
    path = llama_imatrix.save(tmp_path / "m.dat")
    (n_entries,) = struct.unpack_from("<i", path.read_bytes())
    assert n_entries == len(llama_imatrix.sums)
    back, want = load_imatrix(path).mean_squares(), llama_imatrix.mean_squares()
    assert back.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(back[name], want[name], rtol=1e-6)


@pytest.mark.parametrize("blob", [b"", b"GGUF\x03\x00", struct.pack("<i", 0), struct.pack("<ii", 1, 50)])
def test_broken_files_are_imatrix_errors(tmp_path, blob):
    path = tmp_path / "bad.imatrix"
    path.write_bytes(blob)
    with pytest.raises(ImatrixError):
        load_imatrix(path)
    with pytest.raises(ImatrixError, match="No such file"):
        load_imatrix(tmp_path / "missing.gguf")


# ------------------------------------------------------------------------------------------------ quantizing

def test_imatrix_changes_the_quantized_weights(llama_f16, llama_imatrix, tmp_path):
    plain = quantize_gguf(llama_f16, tmp_path / "plain.gguf", "IQ4_XS")
    weighted = quantize_gguf(llama_f16, tmp_path / "weighted.gguf", "IQ4_XS", imatrix=llama_imatrix)
    assert plain.tensor_types == weighted.tensor_types and weighted.imatrix_entries == 14
    a, b = (gguf.GGUFReader(p) for p in (tmp_path / "plain.gguf", tmp_path / "weighted.gguf"))
    data_a, data_b = ({t.name: bytes(t.data) for t in r.tensors} for r in (a, b))
    changed = [n for n in data_a if n.startswith("blk.") and data_a[n] != data_b[n]]
    assert len(changed) >= 12   # every layer matrix but possibly a tie
    assert data_a["token_embd.weight"] == data_b["token_embd.weight"]   # not in the imatrix
    assert b.fields["quantize.imatrix.entries_count"].contents() == 14
    assert b.fields["quantize.imatrix.dataset"].contents() == "text"


@pytest.mark.parametrize("suffix", [".gguf", ".dat"])
def test_llama_cpp_quantizes_with_our_files_down_to_iq2(llama_f16, llama_imatrix, tmp_path, suffix):
    path = llama_imatrix.save(tmp_path / f"m{suffix}")
    result = quantize_gguf(llama_f16, tmp_path / "iq2.gguf", "IQ2_XS", imatrix=path)
    assert result.tensor_types.get("IQ2_XS", 0) >= 8
    reader = gguf.GGUFReader(tmp_path / "iq2.gguf")
    assert reader.fields["quantize.imatrix.file"].contents() == path.name


def test_auto_computes_one_from_the_bundled_text(llama_f16, tmp_path):
    result = quantize_gguf(llama_f16, tmp_path / "iq2.gguf", "IQ2_XXS", imatrix="auto", n_threads=2)
    assert result.imatrix_entries == 14 and result.imatrix_tokens == 4096   # DEFAULT_MAX_TOKENS
    assert gguf.GGUFReader(tmp_path / "iq2.gguf").fields["quantize.imatrix.dataset"].contents() == \
        "edgellm calibration.txt"


def test_imatrix_of_another_model_is_refused(tiny_checkpoint, llama_imatrix, tmp_path):
    other = tmp_path / "gemma.gguf"
    convert(tiny_checkpoint("gemma3_text", **GEMMA_640), other, "f16")
    with pytest.raises(ImatrixError, match="blk.0.attn_q.weight has 256 values, the tensor needs 640"):
        quantize_gguf(other, tmp_path / "q.gguf", "Q4_K_M", imatrix=llama_imatrix)   # same names, other widths
    elsewhere = Imatrix({"blk.7.ffn_up.weight": np.ones((1, 640), np.float32)}, {"blk.7.ffn_up.weight": np.ones(1)})
    with pytest.raises(ImatrixError, match="none of its 1 entries names a tensor of this model"):
        quantize_gguf(other, tmp_path / "q.gguf", "Q4_K_M", imatrix=elsewhere)
    assert not list(tmp_path.glob("q.gguf*"))


# ------------------------------------------------------------------------------------------------ Gemma 270M

@pytest.mark.gemma
def test_gemma_imatrix_matches_numpy_and_quantizes(gemma_gguf, tmp_path):
    m = compute_imatrix(gemma_gguf, TEXT, n_ctx=128, max_tokens=200)
    assert m.n_tokens == 200 and len(m.sums) == 18 * len(MATRICES)
    assert all(c.tolist() == [200.0] for c in m.counts.values())
    tokens = evaluated_tokens(gemma_gguf, TEXT, 128, 200)
    embd = gemma_rows(gemma_gguf, "token_embd.weight", tokens)   # Gemma scales embeddings by sqrt(n_embd)
    x = rms_normed(embd * np.sqrt(640), gemma_rows(gemma_gguf, "blk.0.attn_norm.weight"), 1e-6)
    np.testing.assert_allclose(m.sums["blk.0.attn_q.weight"][0], (x * x).sum(0), rtol=1e-3)
    result = quantize_gguf(gemma_gguf, tmp_path / "q4.gguf", "Q4_K_M", imatrix=m, allow_requantize=True)
    assert result.imatrix_entries == 126 and result.tensor_types["Q4_K"] > 20


def gemma_rows(path: Path, name: str, rows: list[int] | None = None) -> np.ndarray:
    """Dequantized rows of one tensor, read straight from the file (GGUFReader parses the 262k-token vocabulary)."""
    header = read_gguf_header(path)
    info = next(t for t in header.tensors if t.name == name)
    qtype = gguf.GGMLQuantizationType[info.type]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    row_bytes = info.ne[0] // block * size
    n_rows = info.n_elements // info.ne[0]
    raw = np.memmap(path, np.uint8, "r", header.data_start + info.offset, (n_rows, row_bytes))
    picked = np.asarray(raw[rows] if rows is not None else raw)
    return gguf.quants.dequantize(picked, qtype).astype(np.float64).reshape(len(picked), -1).squeeze()
