"""ONNX candidates: the converter's exact file bytes, planning per provider, and a bundle that runs within the
predicted memory."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from edgellm import bundle as bundles
from edgellm.cli import fit as fit_cli
from edgellm.errors import UsageError
from edgellm.fitting import build, fit, inspect_model, onnx_plan
from edgellm.fitting.planner import FORMATS, FitOptions, plan
from edgellm.fitting.tables import builtin_tables
from edgellm.targets import builtin_profiles

from test_fit_plan import GEMMA

TABLES = builtin_tables()
NPU = "intel-core-ultra-npu-16gb"          # the built-in profile whose first backend is ONNX Runtime's
# The process baseline depends on the page cache: fault-around maps whatever of ONNX Runtime's 20+ MB library is
# already cached. The same tiny-model process measured 49.3 MB of file-backed RSS alone and 66.7 MB in the middle
# of a full test run. On a ~100 MB tiny process that swamps any percentage, so the allowance is absolute.
BASELINE_NOISE = 20 * 2**20


@pytest.mark.parametrize("variant", ["llama", "gemma3_text"])
@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_weight_bytes_match_the_converter_exactly(tiny_checkpoint, tmp_path, variant, kind):
    from edgellm.converters.onnx import DATA_FILE, convert_onnx

    model = tiny_checkpoint(variant)
    facts = inspect_model(model, exact=False)
    convert_onnx(model, tmp_path / "out", kind, context_length=512)
    ch = onnx_plan.choices(kind, "onnxruntime-cpu", 512, facts.shape.context_length)
    assert onnx_plan.weight_bytes(facts, ch, 512) == (tmp_path / "out" / DATA_FILE).stat().st_size


def test_npu_profile_plans_onnx_by_default():
    result = plan(GEMMA, builtin_profiles()[NPU], FitOptions(context=4096), TABLES)
    assert result.backend == "onnxruntime-openvino" and result.runtime.provider == "openvino"
    assert {r.candidate.file_type for r in result.rows} == {"ONNX:fp16", "ONNX:int8", "ONNX:int4"}
    assert any("first backend is onnxruntime-openvino" in n for n in result.notes)
    assert any("not measured" in n for n in result.notes)          # the CPU provider's overhead stands in
    data = result.to_dict()
    assert {c["format"] for c in data["candidates"]} == {"onnx"}
    # a KV cache that grows with the context, in the graph's dtype (standard-op attention: past and present)
    small = plan(GEMMA, builtin_profiles()[NPU], FitOptions(context=2048, file_types=("ONNX:int4",)), TABLES)
    big = plan(GEMMA, builtin_profiles()[NPU], FitOptions(context=4096, file_types=("ONNX:int4",)), TABLES)
    assert big.chosen.memory.kv_cache_bytes == 2 * small.chosen.memory.kv_cache_bytes > 0


def test_both_formats_compete_and_gguf_sources_stay_gguf():
    profile = builtin_profiles()["laptop-x86-8gb"]
    result = plan(GEMMA, profile, FitOptions(context=2048, format="both", file_types=("Q4_0", "ONNX:int4")), TABLES)
    assert {r.backend for r in result.rows} == {"llama.cpp-cpu", "onnxruntime-cpu"}
    gguf_source = GEMMA.__class__(**{**GEMMA.__dict__, "source_format": "gguf", "source_type": "F16"})
    with pytest.raises(UsageError, match="Hugging Face checkpoint"):
        plan(gguf_source, profile, FitOptions(format="onnx"), TABLES)
    assert plan(gguf_source, builtin_profiles()[NPU], FitOptions(context=2048), TABLES).backend.startswith("llama.cpp")
    with pytest.raises(UsageError, match="unknown format"):
        FitOptions(format="tflite").check()
    assert fit_cli.FORMATS == FORMATS


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc (VmHWM)")
def test_onnx_bundle_runs_within_the_predicted_memory(tiny_checkpoint, tmp_path):
    from edgellm.fitting.measure import measure

    result = fit(tiny_checkpoint("llama"), "local", context=2048, format="onnx", file_types=("ONNX:int4",))
    bundle = build(result, tmp_path / "bundle")
    manifest = bundles.read_manifest(bundle.path)
    bundles.verify_files(bundle.path, manifest, hashes=True)
    assert manifest.model == "model.onnx" and manifest.runtime.provider == "cpu"
    assert manifest.runtime.kv_type is None and (bundle.path / "genai_config.json").is_file()
    assert bundle.weights_bytes == result.chosen.memory.weights_bytes and not bundle.notes
    measured = measure(bundle.path, max_tokens=32, temperature=0.8)
    assert measured.generated_tokens > 0 and measured.n_ctx == 2048
    predicted = result.chosen.memory.total_bytes
    assert -max(0.02 * measured.peak_rss_bytes, BASELINE_NOISE) <= predicted - measured.peak_rss_bytes \
        <= max(0.05 * measured.peak_rss_bytes, BASELINE_NOISE)


def test_cli_format_onnx_dry_run(tiny_checkpoint, capsys):
    parser = argparse.ArgumentParser()
    fit_cli.register(parser.add_subparsers())
    args = parser.parse_args(["fit", str(tiny_checkpoint("llama")), "--device", "laptop-x86-8gb", "--format", "onnx",
                              "--context", "1024", "--dry-run", "--json"])
    assert args.run(args) == 0
    out = capsys.readouterr()
    data = json.loads(out.out)
    assert data["backend"] == "onnxruntime-cpu" and data["file_type"].startswith("ONNX:")
    assert "ONNX:int4" in out.err
