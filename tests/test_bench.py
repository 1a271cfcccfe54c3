"""``edgellm bench``: predictions read from a bundle manifest, peak memory, and real measurements of Gemma 3
270M (plain file and bundle, library and CLI)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from edgellm import bench as b
from edgellm.bundle import BundleFile, Manifest, write_manifest
from edgellm.errors import ContextOverflowError, SettingsError

PLAN = {"speed": {"decode_tokens_per_s": 40.0}, "memory": {"total_bytes": 400_000_000}}
RESULT_KEYS = {"load_seconds", "ttft_seconds", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes",
               "n_threads", "n_threads_batch", "threads_source", "predictions", "predictions_note", "runs"}


def make_bundle(folder: Path, model: Path, sha256: str, plan: dict | None) -> Path:
    """A bundle folder whose model file links to ``model``, with ``plan`` in its manifest."""
    folder.mkdir()
    (folder / "model.gguf").symlink_to(model)
    files = (BundleFile("model.gguf", model.stat().st_size, sha256, "model"),)
    write_manifest(folder, Manifest(model="model.gguf", files=files, extra={"plan": plan} if plan else {}))
    return folder


def test_predictions_come_from_the_manifest_plan(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    predicted, note = b.manifest_predictions(model)
    assert predicted == {} and "plain model file" in note
    bundle = make_bundle(tmp_path / "bundle", model, "0" * 64, PLAN)
    predicted, note = b.manifest_predictions(bundle)
    assert predicted == {"decode_tokens_per_s": 40.0, "memory_total_bytes": 400_000_000.0} and note is None
    empty = make_bundle(tmp_path / "no-plan", model, "0" * 64, None)
    assert "no plan" in b.manifest_predictions(empty)[1]
    pairs = b.compare(predicted, {"decode_tokens_per_s": 30.0, "peak_rss_bytes": 500_000_000})
    assert [(p.name, p.measured, p.ratio) for p in pairs] == [("decode_tokens_per_s", 30.0, 0.75),
                                                               ("memory_total_bytes", 500_000_000, 1.25)]


_PEAK_CHILD = """
from edgellm import bench as b
b.reset_peak_rss()
before = b.peak_rss_bytes()
block = bytearray(64 << 20)            # 64 MiB, touched so it is resident
block[::4096] = b"x" * len(block[::4096])
print(before, b.peak_rss_bytes())
"""


def test_peak_rss_is_read_and_grows_with_allocation():
    # in a fresh interpreter: this process's own history (what earlier tests allocated and freed) says nothing
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _PEAK_CHILD], capture_output=True, text=True, check=True)
    before, after = map(int, done.stdout.split())
    assert before > 0 and after >= before + (32 << 20)


def test_bad_arguments_are_refused_before_loading(tmp_path):
    with pytest.raises(SettingsError, match="prompt_tokens"):
        b.bench(tmp_path / "missing.gguf", prompt_tokens=1)
    with pytest.raises(SettingsError, match="repeat"):
        b.bench(tmp_path / "missing.gguf", repeat=0)


@pytest.mark.gemma
def test_bench_measures_a_plain_gguf(gemma_gguf):
    result = b.bench(gemma_gguf, prompt_tokens=16, gen_tokens=4, n_ctx=64, n_threads=1, repeat=2)
    assert len(result.runs) == 2 and all(r.prompt_tokens == 16 for r in result.runs)
    assert result.runs[0].generated_tokens == 4
    for value in (result.load_seconds, result.ttft_seconds, result.prefill_tokens_per_s,
                  result.decode_tokens_per_s, result.rss_after_load_bytes):
        assert value > 0
    assert result.peak_rss_bytes >= result.rss_after_load_bytes
    assert (result.n_threads, result.threads_source) == (1, "override")
    assert result.predictions == () and "plain model file" in result.predictions_note
    with pytest.raises(ContextOverflowError):        # llama.cpp rounds the context up to 256 tokens
        b.bench(gemma_gguf, prompt_tokens=result.n_ctx, gen_tokens=8, n_ctx=64, n_threads=1)


@pytest.mark.gemma
def test_cli_json_compares_a_bundle_with_its_plan(gemma_gguf, tmp_path, capsys):
    from edgellm.cli import bench as command
    from edgellm.testing import gemma

    bundle = make_bundle(tmp_path / "bundle", Path(gemma_gguf), gemma.gguf_sha256(), PLAN)
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["bench", str(bundle), "-p", "8", "-n", "3", "--ctx", "64", "--threads", "1",
                              "--repeat", "1", "--json"])
    assert args.run(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert RESULT_KEYS <= set(data) and data["predictions_note"] is None
    by_name = {p["name"]: p for p in data["predictions"]}
    decode = by_name["decode_tokens_per_s"]
    assert decode["predicted"] == 40.0 and decode["measured"] == data["decode_tokens_per_s"] > 0
    assert decode["ratio"] == pytest.approx(decode["measured"] / 40.0)
    assert by_name["memory_total_bytes"]["measured"] == data["peak_rss_bytes"]
