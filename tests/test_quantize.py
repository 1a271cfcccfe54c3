"""llama.cpp quantization through quantize_gguf: the type table, types landing where asked, the checks that keep
llama.cpp from aborting the process, captured logs, progress, and no half-written files."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import gguf
import llama_cpp
import llama_cpp._ggml
import numpy as np
import pytest

from edgellm.converters import convert
from edgellm.converters import quant_types as qt
from edgellm.converters.quantize import capture_llama_log, quantize_gguf, read_gguf_header
from edgellm.errors import ImatrixRequiredError, QuantizeError, QuantTypeRowError, UnknownQuantTypeError, UsageError

# Rows of 256 weights fit every block size; the Gemma-like model has Gemma 3 270M's 640-wide rows.
LLAMA_256 = dict(hidden_size=256, intermediate_size=512)
GEMMA_640 = dict(hidden_size=640, intermediate_size=512, head_dim=256, num_hidden_layers=2)


@pytest.fixture(scope="session")
def llama_f16(tiny_checkpoint, tmp_path_factory) -> Path:
    """A tiny llama (hidden 256, 2 layers, untied head) as F16 GGUF, written by edgellm's converter."""
    out = tmp_path_factory.mktemp("q") / "llama-f16.gguf"
    convert(tiny_checkpoint("llama", **LLAMA_256), out, "f16")
    return out


@pytest.fixture(scope="session")
def gemma640_f16(tiny_checkpoint, tmp_path_factory) -> Path:
    """A tiny gemma3_text with 640-wide rows and tied embeddings, as F16 GGUF."""
    out = tmp_path_factory.mktemp("q") / "gemma640-f16.gguf"
    convert(tiny_checkpoint("gemma3_text", **GEMMA_640), out, "f16")
    return out


def tensor_types(path: Path) -> dict[str, str]:
    """name -> ggml type, read with gguf-py (independent of our header reader)."""
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".partial", ".gguf") and "f16" not in p.name)


# ------------------------------------------------------------------------------------------------ the table

def test_file_types_match_the_installed_llama_cpp():
    for ft in qt.FILE_TYPES.values():
        const = "LLAMA_FTYPE_ALL_F32" if ft.name == "F32" else f"LLAMA_FTYPE_MOSTLY_{ft.name}"
        assert getattr(llama_cpp, const) == ft.ftype, ft.name
        assert ft.main in qt.GGML_TYPES
    ggml = llama_cpp._ggml.libggml   # the C library is the reference for names and block layouts
    ggml.ggml_type_name.restype, ggml.ggml_type_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    ggml.ggml_blck_size.restype, ggml.ggml_blck_size.argtypes = ctypes.c_int64, [ctypes.c_int]
    ggml.ggml_type_size.restype, ggml.ggml_type_size.argtypes = ctypes.c_size_t, [ctypes.c_int]
    for gt in qt.GGML_TYPES.values():
        assert ggml.ggml_type_name(gt.value).decode().upper() == gt.name
        assert (ggml.ggml_blck_size(gt.value), ggml.ggml_type_size(gt.value)) == (gt.block_size, gt.type_size)


def test_bits_per_weight_follow_block_layouts():
    bpw = {name: qt.GGML_TYPES[name].bits_per_weight for name in ("Q8_0", "Q4_0", "Q4_K", "Q6_K", "IQ2_XXS", "F16")}
    assert bpw == {"Q8_0": 8.5, "Q4_0": 4.5, "Q4_K": 4.5, "Q6_K": 6.5625, "IQ2_XXS": 2.0625, "F16": 16.0}
    assert qt.file_type("q4_k").name == "Q4_K_M"   # llama-quantize's alias
    assert qt.file_type("IQ4_XS").nominal_bits_per_weight == 4.25
    assert {n for n, ft in qt.FILE_TYPES.items() if ft.needs_imatrix} == {
        "Q2_K_S", "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"}


def test_unknown_names_are_refused_with_the_known_ones():
    with pytest.raises(UnknownQuantTypeError, match="Q4_K_X") as info:
        qt.file_type("Q4_K_X")
    assert "Q4_K_M" in info.value.hint
    with pytest.raises(UnknownQuantTypeError, match="tensor type"):
        qt.ggml_type("Q8_K")   # a dot-product intermediate, not a storage type


def test_row_alternatives_follow_llama_cpp_fallbacks():
    assert qt.row_alternatives(qt.ggml_type("Q4_K"), 640) == ["Q5_0", "Q8_0", "F16"]
    assert qt.row_alternatives(qt.ggml_type("IQ2_XS"), 640) == ["IQ4_NL", "Q8_0", "F16"]
    assert qt.row_alternatives(qt.ggml_type("Q4_0"), 100) == ["F16"]


# ------------------------------------------------------------------------------------------------ real runs

@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q5_1", "Q3_K_M", "Q4_K_M", "Q6_K", "IQ4_NL", "IQ4_XS", "BF16"])
def test_each_type_gives_its_main_type(llama_f16, tmp_path, name):
    out = tmp_path / f"{name}.gguf"
    result = quantize_gguf(llama_f16, out, name)
    types = tensor_types(out)
    main = qt.file_type(name).main
    layer_weights = [t for n, t in types.items() if n.startswith("blk.") and not n.endswith("norm.weight")]
    assert sum(t == main for t in layer_weights) > len(layer_weights) // 2
    assert all(types[n] == "F32" for n in types if n.endswith("norm.weight"))
    assert result.tensor_types == dict(sorted(Counter(types.values()).items()))
    assert result.path == out and result.size_bytes == out.stat().st_size and not result.fallbacks
    data = sum(t.n_bytes for t in gguf.GGUFReader(out).tensors)
    params = sum(t.n_elements for t in gguf.GGUFReader(out).tensors)
    assert result.bits_per_weight == pytest.approx(8 * data / params)
    assert leftovers(tmp_path) == [out.name]


def test_forced_types_land_where_asked(llama_f16, tmp_path):
    out = tmp_path / "mixed.gguf"
    quantize_gguf(llama_f16, out, "Q4_K_M", output_type="q8_0", embedding_type="Q5_0",
                  overrides={r"blk\.1\.ffn_down": "Q8_0", "attn_v": "Q5_1", "ffn_down": "IQ4_NL"})
    types = tensor_types(out)
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "Q5_0"
    assert types["blk.1.ffn_down.weight"] == "Q8_0"      # first matching pattern wins, as in llama.cpp
    assert types["blk.0.ffn_down.weight"] == "IQ4_NL"
    assert types["blk.0.attn_v.weight"] == types["blk.1.attn_v.weight"] == "Q5_1"
    assert types["blk.0.attn_q.weight"] == "Q4_K"       # untouched tensors follow the recipe


def test_dry_run_predicts_the_real_run(gemma640_f16, tmp_path):
    dry = quantize_gguf(gemma640_f16, tmp_path / "dry.gguf", "Q4_K_M", dry_run=True)
    real = quantize_gguf(gemma640_f16, tmp_path / "real.gguf", "Q4_K_M")
    assert dry.path is None and dry.dry_run and not (tmp_path / "dry.gguf").exists()
    assert dry.tensor_types == real.tensor_types and dry.size_bytes == real.size_bytes


def test_llama_cpp_fallbacks_are_reported(gemma640_f16, tmp_path):
    result = quantize_gguf(gemma640_f16, tmp_path / "q.gguf", "Q4_K_M")
    wanted = {(f.tensor, f.wanted, f.used) for f in result.fallbacks}
    assert ("blk.0.attn_q.weight", "Q4_K", "Q5_0") in wanted
    assert all(f.n_per_row == 640 for f in result.fallbacks if f.tensor != "blk.0.ffn_down.weight")
    assert tensor_types(tmp_path / "q.gguf")["blk.0.attn_q.weight"] == "Q5_0"


def test_progress_counts_every_tensor(llama_f16, tmp_path):
    seen: list[tuple[int, int, str]] = []
    quantize_gguf(llama_f16, tmp_path / "q.gguf", "Q4_0", progress=lambda *a: seen.append(a))
    n = len(read_gguf_header(llama_f16).tensors)
    assert [d for d, _, _ in seen] == list(range(1, n + 1)) and {t for _, t, _ in seen} == {n}
    assert {name for _, _, name in seen} == {t.name for t in read_gguf_header(llama_f16).tensors}


def current_logger() -> int | None:
    cb, ud = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(cb), ctypes.byref(ud))
    return ctypes.cast(cb, ctypes.c_void_p).value


def llama_logs_an_error() -> None:
    llama_cpp.llama_model_load_from_file(b"/nonexistent/model.gguf", llama_cpp.llama_model_default_params())


def test_llama_log_is_captured_and_restored(llama_f16, tmp_path, capfd):
    current = current_logger
    before = current()
    result = quantize_gguf(llama_f16, tmp_path / "q.gguf", "Q4_0")
    out, err = capfd.readouterr()
    assert "blk.0" not in out + err                       # nothing from llama.cpp reached the terminal
    assert any("blk.0.attn_q.weight" in line for line in result.log)
    assert current() == before
    with capture_llama_log() as log:   # nothing logged: an empty capture still restores cleanly
        pass
    assert log.lines == [] and current() == before


def test_overlapping_captures_may_end_in_any_order(capfd):
    """A cancelled quantization ends its capture on its worker thread, possibly after a newer one began."""
    before = current_logger()
    outer, inner = capture_llama_log(), capture_llama_log()
    first, second = outer.__enter__(), inner.__enter__()
    llama_logs_an_error()
    outer.__exit__(None, None, None)           # the older capture ends first
    assert current_logger() != before
    llama_logs_an_error()
    inner.__exit__(None, None, None)
    assert current_logger() == before
    assert first.errors == [] and len(second.errors) >= 2   # the innermost capture of this thread gets lines
    assert "nonexistent" not in "".join(capfd.readouterr())


# ---------------------------------------------------------------------------------- checks before llama.cpp

@pytest.mark.parametrize("kwargs, tensor, option", [
    (dict(embedding_type="Q4_K"), "token_embd.weight", "embedding_type"),
    (dict(output_type="Q6_K"), "token_embd.weight", "output_type"),   # tied: token_embd is the output
    (dict(overrides={"ffn_up": "q4_k"}), "blk.0.ffn_up.weight", "tensor-type pattern 'ffn_up'"),
])
def test_k_quant_on_640_wide_rows_is_refused(gemma640_f16, tmp_path, kwargs, tensor, option):
    with pytest.raises(QuantTypeRowError) as info:
        quantize_gguf(gemma640_f16, tmp_path / "q.gguf", "Q4_K_M", **kwargs)
    error = info.value
    assert (error.tensor, error.n_per_row, error.block_size, error.option) == (tensor, 640, 256, option)
    assert "640" in str(error) and "Q8_0" in error.hint
    assert leftovers(tmp_path) == []


def test_without_the_check_llama_cpp_kills_the_process(gemma640_f16, tmp_path):
    """The trap the check exists for: the same request passed straight to llama.cpp aborts its process."""
    script = f"""
import ctypes, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.token_embedding_type = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, llama_cpp.GGML_TYPE_Q4_K
llama_cpp.llama_model_quantize({str(gemma640_f16).encode()!r}, {str(tmp_path / 'raw.gguf').encode()!r}, ctypes.byref(p))
print("survived")
"""
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert child.returncode != 0 and "survived" not in child.stdout
    assert "GGML_ASSERT" in child.stderr


@pytest.mark.parametrize("name", ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"])
def test_imatrix_types_refuse_to_run_without_one(llama_f16, tmp_path, name):
    with pytest.raises(ImatrixRequiredError, match=name) as info:
        quantize_gguf(llama_f16, tmp_path / "q.gguf", name)
    assert "--imatrix auto" in info.value.hint and "--imatrix FILE" in info.value.hint
    assert leftovers(tmp_path) == []


def test_forced_imatrix_types_need_one_too(llama_f16, tmp_path):
    with pytest.raises(ImatrixRequiredError, match="blk.0.ffn_down.weight"):
        quantize_gguf(llama_f16, tmp_path / "q.gguf", "Q4_K_M", overrides={"ffn_down": "IQ2_XS"})
    # IQ2_XXS on the embedding would hit GGML_ASSERT(imatrix != NULL): no imatrix ever covers token_embd
    with pytest.raises(ImatrixRequiredError, match="token_embd"):
        quantize_gguf(llama_f16, tmp_path / "q.gguf", "Q4_K_M", embedding_type="IQ2_XXS")


def test_overrides_with_a_float_type_or_a_bad_pattern_are_usage_errors(llama_f16, tmp_path):
    with pytest.raises(UsageError, match="no effect"):
        quantize_gguf(llama_f16, tmp_path / "q.gguf", "F16", overrides={"ffn": "Q8_0"})
    with pytest.raises(UsageError, match="regular expression"):
        quantize_gguf(llama_f16, tmp_path / "q.gguf", "Q4_0", overrides={"ffn[": "Q8_0"})


# ------------------------------------------------------------------------------------------ failures and files

def test_llama_cpp_failure_is_a_typed_error_and_leaves_nothing(llama_f16, tmp_path):
    q4 = tmp_path / "q4.gguf"
    quantize_gguf(llama_f16, q4, "Q4_0")
    with pytest.raises(QuantizeError, match="requantizing from type q4_0 is disabled"):
        quantize_gguf(q4, tmp_path / "again.gguf", "Q4_K_M")
    assert leftovers(tmp_path) == ["q4.gguf"]
    quantize_gguf(q4, tmp_path / "again.gguf", "Q4_K_M", allow_requantize=True)
    assert tensor_types(tmp_path / "again.gguf")["blk.0.attn_q.weight"] == "Q4_K"


def test_cancel_from_progress_removes_the_output(llama_f16, tmp_path):
    def cancel(done, total, name):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_gguf(llama_f16, tmp_path / "q.gguf", "Q4_K_M", progress=cancel)
    assert leftovers(tmp_path) == []


def test_ctrl_c_returns_at_once_and_the_worker_cleans_up(llama_f16, tmp_path):
    def interrupt(done, total, name):   # runs on the worker thread: SIGINT lands in the waiting main thread
        if done == 2:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        quantize_gguf(llama_f16, tmp_path / "q.gguf", "Q4_K_M", progress=interrupt)
    for worker in [t for t in threading.enumerate() if t.name == "llama_model_quantize"]:
        worker.join(30)
    assert leftovers(tmp_path) == []


def test_header_reader_agrees_with_gguf_py(llama_f16):
    ours = read_gguf_header(llama_f16)
    theirs = gguf.GGUFReader(llama_f16)
    assert [(t.name, t.ne, t.type, ours.data_start + t.offset) for t in ours.tensors] == [
        (t.name, tuple(int(n) for n in t.shape), t.tensor_type.name, t.data_offset) for t in theirs.tensors]
    assert ours.metadata["general.architecture"] == "llama"
    assert ours.metadata["tokenizer.ggml.tokens"] == len(theirs.fields["tokenizer.ggml.tokens"].data)


def test_not_a_gguf_is_a_quantize_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope" * 10)
    with pytest.raises(QuantizeError, match="not a readable GGUF"):
        quantize_gguf(bad, tmp_path / "out.gguf", "Q4_0")


# ------------------------------------------------------------------------------------------ the real Gemma 270M

@pytest.mark.gemma
def test_gemma_requantizes_and_refuses_the_640_trap(gemma_gguf, tmp_path):
    with pytest.raises(QuantTypeRowError, match="token_embd.weight"):
        quantize_gguf(gemma_gguf, tmp_path / "bad.gguf", "Q4_K_M", embedding_type="Q4_K", allow_requantize=True)
    result = quantize_gguf(gemma_gguf, tmp_path / "q5.gguf", "Q5_K_M", allow_requantize=True,
                           embedding_type="Q5_0")
    types = {t.name: t.type for t in read_gguf_header(tmp_path / "q5.gguf").tensors}   # GGUFReader: 11 s here
    assert types["token_embd.weight"] == "Q5_0" and types["blk.0.ffn_down.weight"] in ("Q5_K", "Q6_K")
    assert any(f.wanted == "Q5_K" and f.used == "Q5_1" for f in result.fallbacks)   # 640-wide rows
    assert result.size_bytes == (tmp_path / "q5.gguf").stat().st_size
    assert np.isfinite(result.bits_per_weight) and 5 < result.bits_per_weight < 6.5
