"""Device calibrations of the speed model: measured efficiency rows and CPU kernel costs (I/O).

``edgellm bench MODEL --calibrate`` (``edgellm.bench.calibrate``; ``benchmarks/fit_accuracy.py --calibrate
--save`` too) measures decode speed on this machine at one and at the planned number of threads and writes
``$XDG_CACHE_HOME/edgellm/calibration.toml`` (``~/.cache`` by default); ``fit --device local`` reads it and
names it in its table and JSON. The file has the keys of ``edgellm/data/efficiency.toml`` plus ``device`` and
the ``[[samples]]`` it was fitted to: a later ``--calibrate`` on another model adds its samples (replacing
those of the same model and thread count) and fits again over all of them::

    schema_version = 1
    device = "local"
    source = "edgellm bench 2026-11-23, Gemma 3 270M F16/Q8_0/Q4_K_M, 2 threads"
    [[efficiency]]
    backend = "llama.cpp-cpu"
    device_class = "*"
    bandwidth = 0.58
    prefill = 0.2
    per_token_s = 0.0004
    per_vocab_s = 4.1e-9
    [cpu_cycles.x86_64]
    Q4_K = 0.41
    [[samples]]
    model = "/models/gemma-q4_k_m.gguf"
    threads = 2
    vocab_size = 262144
    kv_bytes = 1441792
    tokens_per_s = 61.2
    reads = { F32 = [1234, 308], Q4_K = [99000000, 176000000] }

``fit_calibration`` computes such a calibration from measurements (pure: least squares on the speed model).
"""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from edgellm.fitting.facts import ModelFacts
from edgellm.fitting.memory import Settings
from edgellm.fitting.quant import Recipe
from edgellm.fitting.speed import (Calibration, Device, Efficiency, SpeedTables, calibration_from_dict, device_facts,
                                   kv_read_bytes, read_per_token)
from edgellm.targets.schema import DeviceProfile

logger = logging.getLogger(__name__)

FILE_NAME = "calibration.toml"
SCHEMA_VERSION = 1


def calibration_path() -> Path:
    """``$XDG_CACHE_HOME/edgellm/calibration.toml`` (``~/.cache`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgellm" / FILE_NAME


def load_calibration(device: str, path: Path | None = None) -> Calibration | None:
    """The calibration for ``device`` at ``path`` (default location), None when absent, unreadable (logged)
    or made for another device."""
    path = path or calibration_path()
    if not path.is_file():
        return None
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        calibration = calibration_from_dict(data)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        logger.warning("ignoring the calibration %s: %s", path, exc)
        return None
    if calibration.device != device:
        return None
    logger.info("speed calibration from %s (%s)", path, calibration.source)
    return replace(calibration, path=str(path))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(float(value)) if isinstance(value, float) else str(value)


def to_toml(calibration: Calibration, samples: Sequence["SpeedSample"] = ()) -> str:
    """The calibration file's text, with the samples it was fitted to."""
    lines = [f"schema_version = {SCHEMA_VERSION}", f"device = {_toml_value(calibration.device)}",
             f"source = {_toml_value(calibration.source)}"]
    for row in calibration.efficiency:
        lines += ["", "[[efficiency]]"] + [f"{k} = {_toml_value(v)}" for k, v in vars(row).items()]
    for isa, costs in calibration.cpu_cycles.items():
        lines += ["", f"[cpu_cycles.{isa}]"] + [f"{k} = {_toml_value(v)}" for k, v in costs.items()]
    for sample in samples:
        lines += _sample_toml(sample)
    return "\n".join(lines) + "\n"


def save_calibration(calibration: Calibration, path: Path | None = None,
                     samples: Sequence["SpeedSample"] = ()) -> Path:
    """Write the calibration (and the samples it was fitted to) atomically; return its path."""
    path = path or calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(to_toml(calibration, samples), encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Samples: what a calibration is fitted to (kept in the file, so later benches add to them)

MIN_TYPE_SHARE = 0.05       # a type with less of a sample's weights than this keeps its table cost (not identifiable)


@dataclass(frozen=True)
class SpeedSample:
    """One measured decode: per ggml type (bytes, weights) read per token, threads, vocabulary, KV bytes read
    per token, tok/s, and the model file it came from (samples of one model and thread count replace each
    other when a calibration is updated)."""

    reads: dict[str, tuple[int, int]]
    threads: int
    vocab_size: int
    kv_bytes: int
    tokens_per_s: float
    model: str = ""

    @property
    def key(self) -> tuple[str, int]:
        return self.model, self.threads


def sample_from_facts(facts: ModelFacts, types: Recipe, *, threads: int, n_ctx: int, kv_type: str, depth: int,
                      tokens_per_s: float, model: str = "") -> SpeedSample:
    """The sample for a decode of ``facts`` stored as ``types`` on the CPU, measured at ``depth`` tokens of
    context (pure)."""
    shape = facts.shape
    reads = read_per_token(facts.tensors, types, shape.tied_embeddings, 0, shape.n_layers, False)
    kv = kv_read_bytes(shape, Settings(n_ctx=n_ctx, kv_type=kv_type), depth)
    return SpeedSample(reads, threads, shape.vocab_size, kv, tokens_per_s, model)


def _sample_toml(s: SpeedSample) -> list[str]:
    reads = ", ".join(f"{k} = [{b}, {n}]" for k, (b, n) in sorted(s.reads.items()))
    return ["", "[[samples]]", f"model = {_toml_value(s.model)}", f"threads = {s.threads}",
            f"vocab_size = {s.vocab_size}", f"kv_bytes = {s.kv_bytes}",
            f"tokens_per_s = {_toml_value(float(s.tokens_per_s))}",
            f"reads = {{ {reads} }}"]


def samples_from_dict(data: Mapping[str, Any]) -> tuple[SpeedSample, ...]:
    """The ``[[samples]]`` of a calibration file (KeyError/TypeError/ValueError when malformed)."""
    return tuple(SpeedSample(reads={k: (int(v[0]), int(v[1])) for k, v in row["reads"].items()},
                             threads=int(row["threads"]), vocab_size=int(row["vocab_size"]),
                             kv_bytes=int(row["kv_bytes"]), tokens_per_s=float(row["tokens_per_s"]),
                             model=str(row.get("model", ""))) for row in data.get("samples", ()))


def load_samples(device: str, path: Path | None = None) -> tuple[SpeedSample, ...]:
    """The samples stored with the calibration for ``device`` (none when absent, unreadable or another device's)."""
    path = path or calibration_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return samples_from_dict(data) if data.get("device") == device else ()
    except FileNotFoundError:
        return ()
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        logger.warning("ignoring the samples in %s: %s", path, exc)
        return ()


def merge_samples(old: Sequence[SpeedSample], new: Sequence[SpeedSample]) -> tuple[SpeedSample, ...]:
    """``old`` without the (model, threads) pairs ``new`` measures again, then ``new``."""
    keys = {s.key for s in new}
    return tuple(s for s in old if s.key not in keys) + tuple(new)


# ---------------------------------------------------------------------------------------------------------
# Fitting (pure)

def _solve(rows: list[list[float]], targets: list[float]) -> list[float]:
    """Non-negative least squares by projected coordinate descent (small systems, no numpy needed)."""
    n = len(rows[0])
    x = [0.0] * n
    for _ in range(2000):
        for j in range(n):
            num = sum(r[j] * (t - sum(r[k] * x[k] for k in range(n) if k != j)) for r, t in zip(rows, targets))
            den = sum(r[j] * r[j] for r in rows)
            x[j] = max(0.0, num / den) if den else 0.0
    return x


def fitted_types(samples: Sequence[SpeedSample]) -> list[str]:
    """Types holding at least MIN_TYPE_SHARE of some sample's weights: the only ones whose cost is identifiable."""
    kinds = set()
    for s in samples:
        total = sum(n for _, n in s.reads.values()) or 1
        kinds |= {k for k, (_, n) in s.reads.items() if n / total >= MIN_TYPE_SHARE}
    return sorted(kinds)


def sample_seconds(s: SpeedSample, dev: Device, row: Efficiency, cycles: Mapping[str, float],
                   kinds: Sequence[str] | None = None) -> float:
    """Seconds per token the speed model gives ``s`` (only the weight types ``kinds`` when given, else all,
    plus the KV reads and the fixed costs when ``kinds`` is None)."""
    bw = dev.bandwidth * row.bandwidth
    t = sum(max(b / bw, n * cycles.get(k, 0.0) / (s.threads * dev.clock_hz))
            for k, (b, n) in s.reads.items() if kinds is None or k in kinds)
    if kinds is None:
        t += s.kv_bytes / bw + row.per_token_s + s.vocab_size * row.per_vocab_s
    return t


def predict(calibration: Calibration, s: SpeedSample, dev: Device) -> float:
    """Decode tok/s the calibration predicts for sample ``s`` on ``dev`` (its first efficiency row)."""
    return 1.0 / sample_seconds(s, dev, calibration.efficiency[0], calibration.cpu_cycles.get(dev.isa, {}))


def fit_calibration(samples: Sequence[SpeedSample], *, device: str, isa: str, bandwidth: float, clock_hz: float,
                    base: SpeedTables, backend: str = "llama.cpp-cpu", source: str = "") -> Calibration:
    """Fit CPU kernel costs per type and the fixed cost per token to measured decode times, keeping the
    bandwidth efficiency of ``base``. Assumes compute-bound kernels for the fitted types (true for small
    models on few cores, where calibrating is cheap). Only identifiable terms are fitted: types with a real
    share of some sample's weights (``fitted_types``; the rest keep their table cost) and the per-vocabulary
    cost only when the samples differ in vocabulary size. Samples at several thread counts separate the
    kernel cost (divided by threads) from the fixed cost."""
    row = base.row(backend, "*")
    base_cycles = dict(base.cpu_cycles.get(isa, {}))
    kinds = fitted_types(samples)
    vary_vocab = len({s.vocab_size for s in samples}) > 1
    dev = Device(bandwidth=bandwidth, clock_hz=clock_hz, isa=isa, features=frozenset(), threads=1, clock_known=True)
    rows, targets = [], []
    for s in samples:
        known = s.kv_bytes / (bandwidth * row.bandwidth) + (0.0 if vary_vocab else s.vocab_size * row.per_vocab_s)
        known += sample_seconds(s, dev, row, base_cycles, [k for k in s.reads if k not in kinds])
        rows.append([s.reads.get(k, (0, 0))[1] / (s.threads * clock_hz) for k in kinds] + [1.0]
                    + ([float(s.vocab_size)] if vary_vocab else []))
        targets.append(1.0 / s.tokens_per_s - known)
    x = _solve(rows, targets)
    per_vocab = x[len(kinds) + 1] if vary_vocab else row.per_vocab_s
    fitted = replace(row, per_token_s=x[len(kinds)], per_vocab_s=per_vocab, source=source or "fitted")
    return Calibration(device=device, efficiency=(fitted,), cpu_cycles={isa: dict(zip(kinds, x[:len(kinds)]))},
                       source=source)


def update_calibration(samples: Sequence[SpeedSample], profile: DeviceProfile, *, base: SpeedTables,
                       path: Path | None = None, source: str = "") -> tuple[Calibration, tuple[SpeedSample, ...], Path]:
    """Add ``samples`` to those stored for ``profile`` (same model and threads replaced), fit a calibration
    to all of them and write it with its samples. Returns (calibration, every sample, the file's path)."""
    path = path or calibration_path()
    merged = merge_samples(load_samples(profile.id, path), samples)
    dev = device_facts(profile, 1)
    source = f"{source}: {len(merged)} sample(s) of {len({s.model for s in merged})} model(s)"
    calibration = fit_calibration(merged, device=profile.id, isa=dev.isa, bandwidth=dev.bandwidth,
                                  clock_hz=dev.clock_hz, base=base, source=source)
    return replace(calibration, path=str(path)), merged, save_calibration(calibration, path, merged)
