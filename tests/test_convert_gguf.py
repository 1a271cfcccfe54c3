"""HF checkpoint -> GGUF without torch: llama.cpp loads the files and agrees with the numpy reference, the
bytes equal llama.cpp's own converter's (goldens), and bad inputs fail clearly without leaving files behind."""

from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import math
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from edgellm.converters import convert, model_spec
from edgellm.errors import (UsageError, CheckpointError, ConvertOutputError, ConvertTypeError, TokenizerError,
                            UnknownQuantTypeError, UnsafeCheckpointError, UnsupportedArchitectureError)
from edgellm.testing import reference
from edgellm.testing.tiny import ARCHITECTURES, make_checkpoint

GOLDEN = Path(__file__).parent / "fixtures" / "golden" / "convert_hf"
_spec = importlib.util.spec_from_file_location("make_goldens", GOLDEN / "make_goldens.py")
make_goldens = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_goldens)

TYPES = ("f32", "f16", "bf16", "q8_0")
TOKENS = [1, 5, 9, 17, 33, 65, 100, 200, 7, 3, 250, 12]
# Logit error max|llama.cpp - reference| / max|reference|. llama.cpp keeps the KV cache in f16, which alone
# costs ~5e-4; Q8_0 also rounds activations to 8 bits. Measured maxima over the 8 variants: f32 4.8e-4,
# f16 1.3e-3, bf16 1.1e-2, q8_0 4.0e-2. The bounds leave about 2x headroom.
TOLERANCE = {"f32": 1e-3, "f16": 3e-3, "bf16": 2.5e-2, "q8_0": 8e-2}
STRINGS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "  two  spaces\n\nnew lines\tand tabs",
           "numbers 12345 and 3.14159", "naïve café, Straße", "emoji 🦙 and 中文", "I've been 'told' he's there",
           "a", "<s> is text here", "hello<|im_end|>"]


def load(path: Path, **kw) -> llama_cpp.Llama:
    return llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, verbose=False, **kw)


def llama_logits(path: Path, tokens: list[int]) -> np.ndarray:
    llm = load(path, logits_all=True)
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)], dtype=np.float32)


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def fields(path: Path) -> dict:
    return {f.name: f.contents() for f in gguf.GGUFReader(path).fields.values()}


def tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="session")
def converted(tiny_checkpoint, tmp_path_factory):
    """converted(variant, type, dtype="f32", **kw) -> GGUF path, built once per session."""
    cache: dict = {}

    def build(variant: str, type: str, dtype: str = "f32", **kw) -> Path:
        key = json.dumps([variant, type, dtype, kw], sort_keys=True)
        if key not in cache:
            out = tmp_path_factory.mktemp("gguf") / f"{variant}-{type}.gguf"
            convert(tiny_checkpoint(variant, dtype, **kw), out, type)
            cache[key] = out
        return cache[key]

    return build


@pytest.fixture(scope="session")
def reference_logits(tiny_checkpoint):
    cache: dict = {}

    def get(variant: str, dtype: str = "f32", **kw) -> np.ndarray:
        key = json.dumps([variant, dtype, kw], sort_keys=True)
        if key not in cache:
            cache[key] = reference.forward(tiny_checkpoint(variant, dtype, **kw), TOKENS)
        return cache[key]

    return get


# ------------------------------------------------------------------------------------------ llama.cpp runs it

@pytest.mark.parametrize("type", TYPES)
@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_logits_match_reference(variant, type, converted, reference_logits):
    got = llama_logits(converted(variant, type), TOKENS)
    assert rel_error(got, reference_logits(variant)) <= TOLERANCE[type]


@pytest.mark.parametrize("variant", ["llama", "gemma3", "qwen2"])
def test_bf16_and_sharded_checkpoints(variant, converted, reference_logits):
    sharded = converted(variant, "f32", shards=3)
    assert rel_error(llama_logits(sharded, TOKENS), reference_logits(variant)) <= TOLERANCE["f32"]
    one_file = tensors(converted(variant, "f32"))
    assert {n: bytes(t.data) for n, t in tensors(sharded).items()} == {n: bytes(t.data) for n, t in one_file.items()}
    bf16 = converted(variant, "f16", dtype="bf16")
    assert rel_error(llama_logits(bf16, TOKENS), reference_logits(variant, "bf16")) <= TOLERANCE["f16"]


@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_tokenization_matches_the_checkpoint_tokenizer(variant, tiny_checkpoint, converted):
    folder = tiny_checkpoint(variant)
    llm = load(converted(variant, "f16"), vocab_only=True)
    if (folder / "tokenizer.model").is_file():
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        expected, special = sp.encode, False       # raw SentencePiece does not know added tokens
    else:
        tokenizers = pytest.importorskip("tokenizers")
        tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        expected, special = (lambda s: tok.encode(s, add_special_tokens=False).ids), True
    for text in STRINGS:
        assert llm.tokenize(text.encode(), add_bos=False, special=special) == expected(text), text


# ------------------------------------------------------------------------------------------ metadata

def test_gemma3_metadata(converted, tiny_checkpoint):
    kv = fields(converted("gemma3_text", "f16"))
    tok_config = json.loads((tiny_checkpoint("gemma3_text") / "tokenizer_config.json").read_text())
    assert kv["general.architecture"] == "gemma3"
    assert kv["gemma3.block_count"] == 6 and kv["gemma3.attention.head_count_kv"] == 1
    assert kv["gemma3.attention.sliding_window"] == 8 and kv["gemma3.attention.key_length"] == 32
    assert kv["gemma3.rope.freq_base"] == 1e6 and kv["gemma3.rope.freq_base_swa"] == 1e4
    assert kv["tokenizer.ggml.model"] == "llama" and kv["tokenizer.ggml.add_space_prefix"] is False
    assert kv["tokenizer.chat_template"] == tok_config["chat_template"]
    assert kv["tokenizer.ggml.add_bos_token"] is True
    t = tensors(converted("gemma3_text", "f16"))
    assert t["blk.0.attn_q_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in t                       # tied to token_embd


def test_gemma3_wrapper_drops_the_vision_tower(converted):
    kv, t = fields(converted("gemma3", "f32")), tensors(converted("gemma3", "f32"))
    assert kv["gemma3.rope.scaling.type"] == "linear" and kv["gemma3.rope.scaling.factor"] == 8.0
    assert not [n for n in t if "vision" in n or "mm_" in n]
    assert len(t) == 2 + 6 * 13


def test_llama3_and_qwen2_metadata(converted):
    kv, t = fields(converted("llama3", "q8_0")), tensors(converted("llama3", "q8_0"))
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "llama-bpe"
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert t["rope_freqs.weight"].tensor_type == gguf.GGMLQuantizationType.F32     # llama3 rope scaling
    assert t["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    kv, t = fields(converted("qwen2", "bf16")), tensors(converted("qwen2", "bf16"))
    assert kv["tokenizer.ggml.pre"] == "qwen2" and kv["tokenizer.ggml.add_bos_token"] is False
    assert kv["general.sampling.penalty_repeat"] == pytest.approx(1.05)
    assert t["blk.1.attn_k.bias"].tensor_type == gguf.GGMLQuantizationType.F32


def test_phi3_keeps_fused_projections(converted):
    kv, t = fields(converted("phi3", "f16")), tensors(converted("phi3", "f16"))
    assert [int(n) for n in t["blk.0.attn_qkv.weight"].shape] == [64, (4 + 2 * 2) * 16]   # ggml order
    assert [int(n) for n in t["blk.0.ffn_up.weight"].shape] == [64, 2 * 128]
    assert kv["phi3.attention.sliding_window"] == 2047 and kv["phi3.rope.dimension_count"] == 16


def test_spec_describes_layers(tiny_checkpoint):
    spec = model_spec(tiny_checkpoint("gemma3"))
    assert spec.model_type == "gemma3" and spec.n_layers == 6 and spec.head_dim == 32
    assert spec.swa_layers == (True,) * 5 + (False,) and spec.sliding_window == 8
    assert spec.rope_theta == 1e6 and spec.rope_theta_local == 1e4 and spec.rope_scaling.factor == 8.0
    assert spec.embedding_scale == 8.0 and spec.norm_weight_offset == 1.0 and spec.tie_embeddings
    assert spec.kv_cells(0, 100) == 8 and spec.kv_cells(5, 100) == 100
    assert spec.kv_elements_per_token(0) == 2 * 1 * 32
    qwen3 = model_spec(tiny_checkpoint("qwen3"))
    assert qwen3.head_dim == 32 and qwen3.qk_norm and not qwen3.qkv_bias and qwen3.sliding_window is None


# ------------------------------------------------------------------------------------------ llama.cpp's bytes

@pytest.mark.parametrize("type", TYPES)
@pytest.mark.parametrize("case", list(make_goldens.CASES))
def test_same_bytes_as_llama_cpp_converter(case, type, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "golden-cases"
    model = make_goldens.case_dir(root, case)
    if not (model / "config.json").is_file():
        make_goldens.build_case(root, case)
    out = tmp_path_factory.mktemp("golden") / f"{case}-{type}.gguf"
    convert(model, out, type)
    got = make_goldens.describe(out)
    want = json.loads((GOLDEN / f"{case}-{type}.json").read_text(encoding="utf-8"))
    by_name = {t["name"]: t for t in want["tensors"]}
    assert [t for t in got["tensors"] if t != by_name.get(t["name"])] == []
    assert [t["name"] for t in got["tensors"]] == [t["name"] for t in want["tensors"]]
    assert {k: v for k, v in got["kv"].items() if v != want["kv"].get(k)} == {}
    assert got["kv_order"] == want["kv_order"]
    assert got["file_sha256"] == want["file_sha256"]


# ------------------------------------------------------------------------------------------ failures

@pytest.fixture
def workdir(tmp_path):
    """A fresh llama checkpoint (writable) and an empty output folder."""
    model = make_checkpoint("llama", tmp_path / "llama")
    out = tmp_path / "out"
    out.mkdir()
    return model, out


def _fails(model: Path, out: Path, error: type, type: str = "f16") -> Exception:
    with pytest.raises(error) as info:
        convert(model, out / "model.gguf", type)
    assert list(out.iterdir()) == []      # no output, no .partial
    return info.value


def test_pickle_only_checkpoint_is_refused(workdir):
    model, out = workdir
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    error = _fails(model, out, UnsafeCheckpointError)
    assert error.files == ["pytorch_model.bin"] and "never unpickles" in str(error)


def test_truncated_safetensors(workdir):
    model, out = workdir
    blob = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(blob[:len(blob) // 2])
    assert "truncated" in str(_fails(model, out, CheckpointError))


def test_nan_weight_is_named(workdir):
    model, out = workdir
    from edgellm import safetensors as st

    with st.SafetensorsFile(model / "model.safetensors") as f:
        weights = {n: np.array(f.raw(n)) for n in f.names()}
    weights["model.layers.1.mlp.up_proj.weight"][3, 7] = np.nan
    st.write(model / "model.safetensors", weights)
    error = _fails(model, out, CheckpointError)
    assert "model.layers.1.mlp.up_proj.weight" in str(error) and "nan" in str(error)


def test_shape_disagreeing_with_config(workdir):
    model, out = workdir
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    assert "has shape [64, 128] but config.json implies [64, 96]" in str(_fails(model, out, CheckpointError))


def test_unknown_and_missing_tensors(workdir):
    model, out = workdir
    from edgellm import safetensors as st

    with st.SafetensorsFile(model / "model.safetensors") as f:
        weights = {n: np.array(f.raw(n)) for n in f.names()}
    weights["model.layers.1.mlp.up.weight"] = weights.pop("model.layers.1.mlp.up_proj.weight")
    st.write(model / "model.safetensors", weights)
    assert "'model.layers.1.mlp.up.weight' is not part of a llama" in str(_fails(model, out, CheckpointError))
    del weights["model.layers.1.mlp.up.weight"]
    st.write(model / "model.safetensors", weights)
    assert "missing, e.g. model.layers.1.mlp.up_proj.weight" in str(_fails(model, out, CheckpointError))


def test_missing_shard(tmp_path):
    model = make_checkpoint("qwen2", tmp_path / "qwen2", shards=2)
    (model / "model-00002-of-00002.safetensors").unlink()
    out = tmp_path / "out"
    out.mkdir()
    assert "model-00002-of-00002.safetensors" in str(_fails(model, out, CheckpointError))


def test_torch_dtype_claim_is_checked_not_trusted(workdir):
    model, out = workdir
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    result = convert(model, out / "m.gguf", "f32")
    assert result.notes == ("config.json says torch_dtype bfloat16 but the weights are stored as F32; "
                            "converting what is stored",)


def test_unsupported_model_type(workdir):
    model, out = workdir
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
    error = _fails(model, out, UnsupportedArchitectureError)
    assert "'falcon'" in str(error) and "gemma3_text" in str(error) and "phi3" in str(error)


def test_missing_tokenizer(workdir):
    model, out = workdir
    for name in ("tokenizer.model", "tokenizer.json"):
        (model / name).unlink(missing_ok=True)
    assert "tokenizer" in str(_fails(model, out, TokenizerError))


def test_unknown_bpe_pre_tokenizer_is_named(tmp_path):
    model = make_checkpoint("llama3", tmp_path / "llama3")
    out = tmp_path / "out"
    out.mkdir()
    tj = json.loads((model / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (model / "tokenizer.json").write_text(json.dumps(tj))
    assert "Whitespace" in str(_fails(model, out, TokenizerError))


def test_unknown_type(workdir):
    model, out = workdir
    _fails(model, out, UnknownQuantTypeError, type="q3_z")


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_interrupted_write_leaves_nothing(workdir, monkeypatch, exc):
    model, out = workdir
    from edgellm.converters import writer

    real, calls = writer.write_tensor, []

    def fail_third(*args):
        calls.append(1)
        if len(calls) == 3:
            assert (out / "model.gguf.partial").is_file()       # the partial file exists until the failure
            raise exc
        return real(*args)

    monkeypatch.setattr(writer, "write_tensor", fail_third)
    error = _fails(model, out, ConvertOutputError if isinstance(exc, OSError) else KeyboardInterrupt)
    if isinstance(exc, OSError):
        assert "disk is full" in str(error)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux /dev/full")
def test_full_disk_is_reported(workdir, monkeypatch):
    model, out = workdir
    import gguf.gguf_writer

    # every file the GGUF writer opens is /dev/full, where writes fail with ENOSPC as on a full disk
    monkeypatch.setattr(gguf.gguf_writer, "open", lambda *a, **kw: open("/dev/full", "wb"), raising=False)
    assert "disk is full" in str(_fails(model, out, ConvertOutputError))


def test_f16_overflow_is_refused(workdir):
    model, out = workdir
    from edgellm import safetensors as st

    with st.SafetensorsFile(model / "model.safetensors") as f:
        weights = {n: np.array(f.raw(n)) for n in f.names()}
    weights["model.layers.0.self_attn.v_proj.weight"][0, 0] = 1e6
    st.write(model / "model.safetensors", weights)
    assert "bf16" in _fails(model, out, ConvertTypeError).hint
    convert(model, out / "ok.gguf", "bf16")       # bf16 keeps the range


# ------------------------------------------------------------------------------------------ other types, CLI

def test_quantized_type_goes_through_llama_cpp(tiny_checkpoint, reference_logits, tmp_path):
    result = convert(tiny_checkpoint("gemma3_text"), tmp_path / "q.gguf", "Q4_K_M")
    assert list(tmp_path.iterdir()) == [tmp_path / "q.gguf"]          # the f16 intermediate is gone
    assert result.type == "Q4_K_M" and result.tensor_types["F32"] == 37
    assert any("not Q4_K" in note for note in result.notes)           # 64-wide rows cannot hold Q4_K blocks
    assert rel_error(llama_logits(result.path, TOKENS), reference_logits("gemma3_text")) < 0.15


def test_cli_writes_file_and_json(tiny_checkpoint, tmp_path, capsys):
    from edgellm.cli import convert as cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["convert", str(tiny_checkpoint("qwen3")), "-o", str(tmp_path / "m.gguf"),
                              "--type", "q8_0", "--json"])
    assert args.run(args) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["type"] == "Q8_0" and summary["tensor_types"] == {"F32": 9, "Q8_0": 15}
    assert summary["size_bytes"] == (tmp_path / "m.gguf").stat().st_size
    assert math.isclose(summary["bits_per_weight"], 8.59, abs_tol=0.01) and summary["model"]["n_layers"] == 2
    assert "100%" in captured.err                                      # progress bar on stderr


def test_cli_imatrix_calibration_and_tensor_overrides(tiny_checkpoint, tmp_path, capsys):
    from edgellm.cli import convert as cli
    from edgellm.converters.quantize import read_gguf_header

    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    out = tmp_path / "m.gguf"
    args = parser.parse_args(["convert", str(tiny_checkpoint("llama")), "-o", str(out), "--type", "q4_0",
                              "--imatrix", "auto", "--calibration", str(text), "--tensor-type", "ffn_down=q8_0",
                              "--json", "--quiet"])
    assert args.run(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["imatrix_tokens"] > 100
    assert any("importance matrix computed on" in n and "calib.txt" in n for n in summary["notes"])
    types = {t.name: t.type for t in read_gguf_header(out).tensors}
    assert {types[f"blk.{i}.ffn_down.weight"] for i in range(2)} == {"Q8_0"}
    assert types["blk.0.ffn_up.weight"] == "Q4_0"


def test_calibration_without_imatrix_auto_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(UsageError, match="calibration"):
        convert(tiny_checkpoint("llama"), tmp_path / "m.gguf", "Q4_0", calibration=tmp_path / "x.txt")
    assert not list(tmp_path.iterdir())


def test_result_reports_what_was_written(tiny_checkpoint, tmp_path):
    result = convert(tiny_checkpoint("llama"), tmp_path / "m.gguf", "F16")
    assert result.size_bytes == (tmp_path / "m.gguf").stat().st_size
    assert result.tensor_types == {"F16": 16, "F32": 5} and result.n_params == 123_200
    assert 16.0 < result.bits_per_weight < 16.1 and result.seconds > 0 and result.notes == ()


# ------------------------------------------------------------------------------------------ the real Gemma 3 270M

@pytest.mark.gemma
@pytest.mark.slow
def test_real_gemma3_270m_round_trips(gemma_gguf, gemma_checkpoint, tmp_path):
    """The bf16 checkpoint rebuilt from the released Q4_K_M GGUF converts back to the same model."""
    from edgellm.converters.quantize import read_gguf_header   # struct walk: GGUFReader takes ~10 s per vocab

    ours = convert(gemma_checkpoint, tmp_path / "gemma-f16.gguf", "f16").path
    original, converted_ = read_gguf_header(gemma_gguf), read_gguf_header(ours)
    want = {t.name: _rows(gemma_gguf, original, t) for t in original.tensors}
    got = {t.name: _rows(ours, converted_, t) for t in converted_.tensors}
    assert set(got) == set(want)
    for name, a in want.items():
        assert np.abs(a - got[name]).max() <= 1e-2 * np.abs(a).max(), name    # bf16 + f16 rounding: 0.4% measured
    hyper = lambda h: {k: v for k, v in h.metadata.items() if k.startswith("gemma3.")}  # noqa: E731
    # llama.cpp's converter has written rope.freq_base_swa since this GGUF was made; the rest must agree
    assert {k: v for k, v in hyper(converted_).items() if k != "gemma3.rope.freq_base_swa"} == hyper(original)
    # (the unk id is not compared: llama.cpp takes it from tokenizer.json, which the rebuilt checkpoint lacks)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        assert list(np.ravel(converted_.metadata[key])) == list(np.ravel(original.metadata[key])), key
    llm = load(gemma_gguf, logits_all=True)
    tokens = llm.tokenize(b"The capital of France is Paris. The capital of Germany is", add_bos=True)
    llm.eval(tokens)
    reference_top = np.array(llm.scores[:len(tokens)]).argmax(1)
    top = llama_logits(ours, tokens).argmax(1)
    assert (top == reference_top).mean() >= 0.9 and llm.detokenize([int(top[-1])]) == b" Berlin"


def _rows(path: Path, header, info, max_rows: int = 8192) -> np.ndarray:
    """The first ``max_rows`` rows of a GGUF tensor as float32 (numpy dequantization of 262k rows is slow)."""
    qtype = gguf.GGMLQuantizationType[info.type]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = min(max_rows, int(np.prod(info.ne[1:], dtype=np.int64)))
    row_bytes = info.ne[0] // block * size
    data = np.memmap(path, np.uint8, "r", header.data_start + info.offset, (rows, row_bytes))
    return gguf.quants.dequantize(np.array(data), qtype).reshape(-1)
