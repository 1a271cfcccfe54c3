"""fit + build end to end on tiny checkpoints: exact weights, the bundle manifest, atomic writes, the CLI."""

from __future__ import annotations

import argparse
import json

import pytest

from edgellm import bundle as bundles
from edgellm.cli import fit as fit_cli
from edgellm.errors import EdgeLLMError, FitSourceError, UsageError
from edgellm.fitting import build, fit, inspect_model, quant
from edgellm.fitting import bundler as build_module
from edgellm.fitting.bundler import PARTIAL_PREFIX

STABLE_KEYS = ("plan.memory.total_bytes", "plan.memory.weights_bytes", "plan.memory.kv_cache_bytes",
               "plan.speed.decode_tokens_per_s", "runtime.n_ctx", "runtime.n_threads")


def _get(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


@pytest.fixture(scope="module")
def tiny_plan(tiny_checkpoint):
    return fit(tiny_checkpoint("llama"), "laptop-x86-8gb", context=1024, file_types=("Q8_0", "Q4_0", "F16"))


@pytest.mark.parametrize("variant", ["llama", "qwen3", "gemma3_text", "phi3"])
def test_inspect_gets_llama_cpps_exact_types(tiny_checkpoint, variant):
    facts = inspect_model(tiny_checkpoint(variant), file_types=("Q8_0", "Q4_K_M", "Q6_K", "IQ4_XS"))
    assert facts.source_format == "hf" and set(facts.recipes) == {"Q8_0", "Q4_K_M", "Q6_K", "IQ4_XS"}
    for file_type, exact in facts.recipes.items():     # the rules table agrees with llama.cpp's dry run
        assert quant.approximate_recipe(facts.tensors, facts.shape, file_type) == exact, file_type


def test_plan_predicts_the_written_weights_exactly(tiny_plan, tmp_path):
    bundle = build(tiny_plan, tmp_path / "b")
    assert tiny_plan.chosen.weights_exact
    assert bundle.weights_bytes == tiny_plan.chosen.memory.weights_bytes
    assert not bundle.notes


def test_bundle_manifest_verifies_and_has_the_stable_keys(tiny_plan, tmp_path):
    out = build(tiny_plan, tmp_path / "bundle").path
    manifest = bundles.read_manifest(out)
    bundles.verify_files(out, manifest, hashes=True)
    data = json.loads((out / bundles.MANIFEST_NAME).read_text())
    for key in STABLE_KEYS:
        assert isinstance(_get(data, key), (int, float)), key
    assert {f["path"] for f in data["files"]} == {manifest.model, "llama.cpp.txt", "Modelfile"}
    assert data["target"]["id"] == "laptop-x86-8gb" and data["target"]["memory"]["usable"] > 0
    assert len(data["source"]["sha256"]) == 64 and data["source"]["format"] == "hf"
    assert data["runtime"]["n_ctx"] == 1024 == tiny_plan.runtime.n_ctx
    assert data["plan"]["memory"]["total_bytes"] == tiny_plan.chosen.memory.total_bytes
    llama = (out / "llama.cpp.txt").read_text()
    modelfile = (out / "Modelfile").read_text()
    assert f"-m {manifest.model}" in llama and "-c 1024" in llama and f"-t {tiny_plan.runtime.n_threads}" in llama
    assert f"FROM ./{manifest.model}" in modelfile and "PARAMETER num_ctx 1024" in modelfile


def test_the_bundle_runs(tiny_plan, tmp_path):
    from edgellm.runtime import Runtime

    out = build(tiny_plan, tmp_path / "run").path
    with Runtime.load(out) as runtime:
        assert runtime.info.n_ctx == 1024 and runtime.info.threads_source == "manifest"
        assert runtime.generate("hello", max_tokens=4).stats.generated_tokens >= 1


def test_build_is_atomic(tiny_plan, tmp_path, monkeypatch):
    def broken(plan, path):
        path.write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "write_model", broken)
    with pytest.raises(KeyboardInterrupt):
        build(tiny_plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(PARTIAL_PREFIX)]


def test_build_refuses_a_non_empty_folder(tiny_plan, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(UsageError):
        build(tiny_plan, tmp_path / "taken")


def test_gguf_source_is_copied_as_is_or_requantized_down(tiny_plan, tmp_path):
    first = build(tiny_plan, tmp_path / "first")
    again = fit(first.model_path, "laptop-x86-8gb", context=1024)
    kinds = [r.candidate.file_type for r in again.rows]
    assert kinds[0] == "SOURCE" and "F16" not in kinds
    assert again.chosen.candidate.file_type == "SOURCE"
    second = build(again, tmp_path / "second")
    assert bundles.sha256_file(second.model_path) == bundles.sha256_file(first.model_path)


def test_unknown_sources_are_refused(tmp_path):
    with pytest.raises(FitSourceError):
        fit(tmp_path / "missing", "laptop-x86-8gb")
    with pytest.raises(FitSourceError):
        fit(tmp_path, "laptop-x86-8gb")      # a folder without config.json


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    fit_cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.run(args)


def test_cli_dry_run_prints_the_table_and_json(tiny_checkpoint, capsys):
    assert _cli(["fit", str(tiny_checkpoint("qwen3")), "--device", "jetson-orin", "--dry-run", "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["device"]["requested"] == "jetson-orin" and data["chosen"]
    assert "resolved to" in captured.err and "CANDIDATE" in captured.err and "* " in captured.err


def test_cli_builds_and_fails_with_the_suggestion(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "cli-bundle"
    assert _cli(["fit", str(tiny_checkpoint("llama")), "--device", "raspberry-pi-5-4gb", "--context", "512",
                 "-o", str(out)]) == 0
    assert (out / "edgellm.json").is_file() and capsys.readouterr().out.strip() == str(out)
    with pytest.raises(EdgeLLMError) as info:
        _cli(["fit", str(tiny_checkpoint("llama")), "--device", "raspberry-pi-5-4gb", "--max-quality-loss", "0",
              "--dry-run"])
    assert info.value.exit_code != 0 and "--max-quality-loss" in info.value.hint


@pytest.mark.slow
def test_measure_quality_replaces_the_priors(tiny_checkpoint):
    result = fit(tiny_checkpoint("llama"), "laptop-x86-8gb", context=1024, measure_quality=True,
                 file_types=("F16", "Q8_0", "Q4_0"))
    rows = {r.candidate.file_type: r for r in result.rows}
    assert all(r.quality.source == "measured" for r in rows.values())
    assert rows["F16"].quality.kld == 0.0                   # the reference itself
    assert rows["Q8_0"].quality.kld < rows["Q4_0"].quality.kld
    assert result.facts.measured_kld["Q4_0"] == rows["Q4_0"].quality.kld


def test_fit_local_can_calibrate_early_exit_into_the_bundle(tiny_checkpoint, tmp_path):
    plan = fit(tiny_checkpoint("llama"), "local", context=512, file_types=("Q8_0",))
    bundle = build(plan, tmp_path / "b", early_exit=True)
    data = json.loads((bundle.path / bundles.MANIFEST_NAME).read_text())
    assert data["early_exit"]["mode"] in ("lossless", "off") and data["early_exit"]["reason"]
    assert bundle.manifest.extra["early_exit"] == data["early_exit"]
    assert any(note.startswith("early exit: ") for note in bundle.notes)
    bundles.verify_files(bundle.path, bundles.read_manifest(bundle.path), hashes=True)


def test_early_exit_calibration_is_refused_for_another_device(tiny_plan, tmp_path):
    with pytest.raises(UsageError) as info:
        build(tiny_plan, tmp_path / "b", early_exit=True)
    assert "exit calibrate" in info.value.hint
    assert not list(tmp_path.iterdir())
