"""Speed calibration: fitting (pure), the file with its samples, and `edgellm bench --calibrate` feeding
`edgellm fit --device local` on a tiny model."""

from __future__ import annotations

import argparse
import json

import pytest

from edgellm.fitting import calibration as cal
from edgellm.fitting.speed import Calibration, Device, Efficiency, SpeedTables
from edgellm.fitting.tables import builtin_tables

CLOCK, BANDWIDTH = 3.0e9, 50e9
DEV = Device(bandwidth=BANDWIDTH, clock_hz=CLOCK, isa="x86_64", features=frozenset(), threads=1, clock_known=True)
BASE = SpeedTables(efficiency=(Efficiency("llama.cpp-cpu", "*", bandwidth=0.6, prefill=0.25, per_vocab_s=4e-9),),
                   cpu_cycles={"x86_64": {"Q8_0": 0.3, "F32": 0.9}}, flops_per_cycle={})


def _truth(per_token: float, q8: float, q4: float) -> Calibration:
    row = Efficiency("llama.cpp-cpu", "*", bandwidth=0.6, prefill=0.25, per_token_s=per_token, per_vocab_s=4e-9)
    return Calibration("local", (row,), {"x86_64": {"Q8_0": q8, "Q4_K": q4, "F32": 0.9}})


def _samples(truth: Calibration) -> list[cal.SpeedSample]:
    """Decodes of two models (Q8_0 and Q4_K main types, a few F32 norms) at 1 and 2 threads, timed by ``truth``."""
    out = []
    for model, kind, n in (("a", "Q8_0", 50_000_000), ("b", "Q4_K", 80_000_000)):
        reads = {kind: (n, n), "F32": (40_000, 10_000)}      # bytes do not matter: compute-bound here
        for threads in (1, 2):
            s = cal.SpeedSample(reads, threads, 32_000, 100_000, 1.0, model)
            out.append(cal.SpeedSample(reads, threads, 32_000, 100_000, cal.predict(truth, s, DEV), model))
    return out


def test_fit_recovers_kernel_and_fixed_costs():
    truth = _truth(per_token=0.002, q8=0.5, q4=0.8)
    fitted = cal.fit_calibration(_samples(truth), device="local", isa="x86_64", bandwidth=BANDWIDTH, clock_hz=CLOCK,
                                 base=BASE)
    assert fitted.efficiency[0].per_token_s == pytest.approx(0.002, rel=1e-3)
    assert fitted.cpu_cycles["x86_64"]["Q8_0"] == pytest.approx(0.5, rel=1e-3)
    assert fitted.cpu_cycles["x86_64"]["Q4_K"] == pytest.approx(0.8, rel=1e-3)
    # F32 holds 0.02% of the weights: not identifiable, so it keeps the table cost (absent from the calibration)
    assert "F32" not in fitted.cpu_cycles["x86_64"]
    # one vocabulary size: the per-vocabulary cost cannot be told from the per-token cost and stays the table's
    assert fitted.efficiency[0].per_vocab_s == BASE.efficiency[0].per_vocab_s


def test_samples_round_trip_and_merge(tmp_path):
    samples = _samples(_truth(0.001, 0.4, 0.6))
    calibration = cal.fit_calibration(samples, device="local", isa="x86_64", bandwidth=BANDWIDTH, clock_hz=CLOCK,
                                      base=BASE, source="test")
    path = cal.save_calibration(calibration, tmp_path / "c.toml", samples)
    assert cal.load_samples("local", path) == tuple(samples)
    assert cal.load_samples("jetson-orin-nano-8gb", path) == ()
    loaded = cal.load_calibration("local", path)
    assert loaded.path == str(path) and loaded.cpu_cycles == calibration.cpu_cycles
    again = cal.SpeedSample(samples[0].reads, 1, 32_000, 100_000, 123.0, "a")
    merged = cal.merge_samples(samples, [again])
    assert len(merged) == len(samples) and merged[-1].tokens_per_s == 123.0
    assert not (tmp_path / "c.toml.partial").exists()


def test_broken_calibration_file_is_ignored(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("device = 'local'\n[[samples]]\nthreads = 'x'\n")
    assert cal.load_samples("local", path) == ()
    path.write_text("not toml [")
    assert cal.load_calibration("local", path) is None


@pytest.fixture(scope="module")
def tiny_gguf(tiny_checkpoint, tmp_path_factory):
    from edgellm.converters import convert

    out = tmp_path_factory.mktemp("cal") / "tiny-q8_0.gguf"
    convert(tiny_checkpoint("llama"), out, type="q8_0")
    return out


def test_bench_calibrates_and_fit_local_uses_it(tiny_checkpoint, tiny_gguf, tmp_path, monkeypatch):
    from edgellm import bench
    from edgellm.fitting import fit
    from edgellm.fitting.report import render
    from edgellm.fitting.speed import device_facts

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = tiny_checkpoint("llama")
    before = fit(model, "local", context=1024, file_types=("Q8_0",), exact_weights=False)
    assert before.calibration is None and "speed calibration: none" in render(before)

    result = bench.calibrate(tiny_gguf, prompt_tokens=16, gen_tokens=16, repeat=2)
    assert result.path == str(cal.calibration_path()) and cal.calibration_path().is_file()
    assert [p.threads for p in result.points] == list(bench.calibration_threads(before.runtime.n_threads))
    assert all(p.measured_tokens_per_s > 0 and p.predicted_tokens_per_s > 0 for p in result.points)

    after = fit(model, "local", context=1024, file_types=("Q8_0",), exact_weights=False)
    assert after.calibration["path"] == result.path and "bench --calibrate" in after.calibration["source"]
    assert "speed calibration: " + result.path in render(after)
    assert json.loads(json.dumps(after.to_dict()))["calibration"]["path"] == result.path
    # the plan's decode speed is the calibrated model's: same settings as a sample at depth 1 on 2 threads
    loaded = cal.load_calibration("local")
    facts, threads = after.facts, after.runtime.n_threads
    types = {t.name: "Q8_0" if t.name in {x.name for x in facts.tensors if len(x.ne) > 1} else t.type
             for t in facts.tensors}
    probe = cal.sample_from_facts(facts, types, threads=threads, n_ctx=1024, kv_type="f16", depth=1, tokens_per_s=1.0)
    expected = cal.predict(loaded, probe, device_facts(after.profile, threads))
    assert after.chosen.speed.decode_tokens_per_s == pytest.approx(expected, rel=0.02)
    assert after.chosen.speed.decode_tokens_per_s != pytest.approx(before.chosen.speed.decode_tokens_per_s, rel=0.01)

    # a second model adds its samples to the file instead of replacing the first one's
    second = bench.calibrate(tiny_gguf, threads=(1,), prompt_tokens=16, gen_tokens=16, repeat=1)
    assert second.n_samples == len(result.points)     # same model and threads: replaced, not added


def test_cli_calibrate_json(tiny_gguf, tmp_path, monkeypatch, capsys):
    from edgellm.cli import bench as command

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["bench", str(tiny_gguf), "--calibrate", "-p", "8", "-n", "8", "--repeat", "1",
                              "--threads", "1", "--json"])
    assert args.run(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["device"] == "local" and [p["threads"] for p in data["points"]] == [1]
    assert (tmp_path / "edgellm" / "calibration.toml").is_file()


def test_calibrate_refuses_onnx(tmp_path):
    from edgellm import bench
    from edgellm.errors import UsageError

    model = tmp_path / "model.onnx"
    model.write_bytes(b"")
    with pytest.raises(UsageError, match="not a GGUF"):
        bench.calibrate(model)


def test_builtin_tables_carry_no_calibration():
    assert builtin_tables().calibration is None
