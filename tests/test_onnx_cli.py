"""The ONNX path through the command line: `edgellm convert --format onnx` writes a folder (progress bar,
--json summary), options of the other format are refused by name, and `edgellm run` loads the plain folder
(no edgellm.json) with the execution provider asked for, or reports the fallback."""

from __future__ import annotations

import contextlib
import io
import json

import onnxruntime as ort
import pytest

from edgellm import cli
from edgellm.errors import UsageError


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))       # thread tuning cache


@pytest.fixture(scope="module")
def int4_folder(tiny_checkpoint, tmp_path_factory):
    """`edgellm convert --format onnx --type int4 --block-size 64 --json`: (folder, parsed JSON, stderr).
    Module-scoped (built once), so it captures with redirect_* rather than capsys."""
    out = tmp_path_factory.mktemp("cli") / "tiny-int4"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["convert", str(tiny_checkpoint("llama")), "--format", "onnx", "--type", "int4",
                         "--block-size", "64", "-o", str(out), "--json"])
    assert code == 0, stderr.getvalue()
    return out, json.loads(stdout.getvalue()), stderr.getvalue()


def test_convert_onnx_writes_the_folder_and_json(int4_folder):
    out, result, err = int4_folder
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.gguf"} <= {p.name for p in out.iterdir()}
    assert (result["format"], result["type"], result["provider"]) == ("onnx", "int4", "cpu")
    assert result["choices"]["block_size"] == 64 and result["op_counts"]["com.microsoft.MatMulNBits"] > 0
    assert result["path"] == str(out) and result["size_bytes"] > 0
    assert "100%" in err                        # the progress bar's final state (stderr is not a terminal)


def test_convert_onnx_summary_line(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "fp32"
    assert cli.main(["convert", str(tiny_checkpoint("qwen2")), "--format", "onnx", "-o", str(out), "-q",
                     "--provider", "openvino"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"wrote {out} (") and "fp32 for openvino" in captured.out
    assert captured.err.count("note:") >= 1        # openvino: attention from standard ops, said so
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["session_options"]


@pytest.mark.parametrize("fmt,flags,named", [
    ("onnx", ["--imatrix", "auto"], "--imatrix"),
    ("onnx", ["--target-bpw", "4.5", "--tensor-type", "attn_v=q8_0"], "--target-bpw, --tensor-type"),
    ("gguf", ["--block-size", "64"], "--block-size"),
    ("gguf", ["--provider", "cuda", "--asymmetric"], "--provider, --asymmetric"),
])
def test_options_of_the_other_format_are_refused(fmt, flags, named, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["convert", str(tiny_checkpoint("llama")), "--format", fmt, "-o", str(out), *flags])
    err = capsys.readouterr().err
    assert code == UsageError(problem="").exit_code
    assert named in err and f"not --format {fmt}" in err and "hint: drop" in err
    assert not out.exists()


def test_convert_gguf_is_unchanged(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert cli.main(["convert", str(tiny_checkpoint("llama")), "-o", str(out), "--type", "f32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["type"] == "F32" and out.is_file() and "format" not in result


def test_run_loads_a_plain_onnx_folder(int4_folder, capsys):
    out, _, _ = int4_folder
    assert not (out / "edgellm.json").exists()
    code = cli.main(["run", str(out), "-p", "Hello", "-n", "4", "--threads", "1", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    info = result["info"]
    assert info["backend"] == "onnxruntime-cpu" and info["model_path"] == str(out / "model.onnx")
    assert info["provider"] == "CPUExecutionProvider" and info["provider_note"] is None
    assert "exported for it" in info["provider_reason"] or "only" in info["provider_reason"]
    assert 1 <= result["stats"]["generated_tokens"] <= 4


def test_run_with_a_missing_provider_reports_the_fallback(int4_folder, capsys):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: nothing to fall back from")
    out, _, _ = int4_folder
    code = cli.main(["run", str(out), "-p", "Hi", "-n", "2", "--threads", "1", "--provider", "cuda", "--json"])
    assert code == 0
    info = json.loads(capsys.readouterr().out)["info"]
    assert info["backend"] == "onnxruntime-cpu" and info["provider"] == "CPUExecutionProvider"
    assert "CUDAExecutionProvider" in info["provider_note"] and "falling back" in info["provider_note"]


def test_provider_on_a_gguf_is_refused(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert cli.main(["convert", str(tiny_checkpoint("llama")), "-o", str(out), "--type", "f32", "-q"]) == 0
    code = cli.main(["run", str(out), "-p", "Hi", "-n", "1", "--provider", "cuda"])
    assert code != 0 and "provider" in capsys.readouterr().err


def test_python_api_dispatches_on_format(tiny_checkpoint, tmp_path):
    import edgellm
    from edgellm.converters.onnx import OnnxConvertResult

    model = tiny_checkpoint("qwen3")
    result = edgellm.convert(model, tmp_path / "q", "int8", format="onnx", block_size=64, provider="cpu")
    assert isinstance(result, OnnxConvertResult) and result.choices.block_size == 64
    assert (tmp_path / "q" / "model.onnx").is_file()
    with pytest.raises(UsageError, match="imatrix only apply to format='gguf'"):
        edgellm.convert(model, tmp_path / "r", "int4", format="onnx", imatrix="auto")
    with pytest.raises(UsageError, match="block_size only apply to format='onnx'"):
        edgellm.convert(model, tmp_path / "r.gguf", "f32", block_size=64)
    with pytest.raises(UsageError, match="'tflite' is not one of"):
        edgellm.convert(model, tmp_path / "r", format="tflite")
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.gguf").exists()
