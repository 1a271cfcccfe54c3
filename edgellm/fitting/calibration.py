"""Device calibrations of the speed model: measured efficiency rows and CPU kernel costs (I/O).

``edgellm bench`` (or ``benchmarks/fit_accuracy.py --calibrate``) measures decode speed on the device and
writes ``$XDG_CACHE_HOME/edgellm/calibration.toml`` (``~/.cache`` by default); ``fit --device local`` reads
it. The file has the keys of ``edgellm/data/efficiency.toml`` plus ``device``::

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

``fit_calibration`` computes such a calibration from measurements (pure: least squares on the speed model).
"""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from edgellm.fitting.speed import Calibration, SpeedTables, calibration_from_dict

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
    return calibration


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(float(value)) if isinstance(value, float) else str(value)


def to_toml(calibration: Calibration) -> str:
    """The calibration file's text."""
    lines = [f"schema_version = {SCHEMA_VERSION}", f"device = {_toml_value(calibration.device)}",
             f"source = {_toml_value(calibration.source)}"]
    for row in calibration.efficiency:
        lines += ["", "[[efficiency]]"] + [f"{k} = {_toml_value(v)}" for k, v in vars(row).items()]
    for isa, costs in calibration.cpu_cycles.items():
        lines += ["", f"[cpu_cycles.{isa}]"] + [f"{k} = {_toml_value(v)}" for k, v in costs.items()]
    return "\n".join(lines) + "\n"


def save_calibration(calibration: Calibration, path: Path | None = None) -> Path:
    """Write the calibration atomically; return its path."""
    path = path or calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(to_toml(calibration), encoding="utf-8")
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class SpeedSample:
    """One measured decode: per ggml type (bytes, weights) read per token, threads, vocabulary, tok/s."""

    reads: dict[str, tuple[int, int]]
    threads: int
    vocab_size: int
    kv_bytes: int
    tokens_per_s: float


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


def fit_calibration(samples: Sequence[SpeedSample], *, device: str, isa: str, bandwidth: float, clock_hz: float,
                    base: SpeedTables, backend: str = "llama.cpp-cpu", source: str = "") -> Calibration:
    """Fit CPU kernel costs per type and the per-token and per-vocabulary costs to measured decode times,
    keeping the bandwidth efficiency of ``base``. Assumes compute-bound kernels for the fitted types (the
    samples should be taken where that holds: few threads, small models); types the samples do not cover
    keep their table values."""
    kinds = sorted({k for s in samples for k in s.reads})
    rows, targets = [], []
    row = base.row(backend, "*")
    for s in samples:
        rows.append([s.reads.get(k, (0, 0))[1] / (s.threads * clock_hz) for k in kinds] + [1.0, s.vocab_size])
        targets.append(1.0 / s.tokens_per_s - s.kv_bytes / (bandwidth * row.bandwidth))
    x = _solve(rows, targets)
    cycles = dict(zip(kinds, x[:len(kinds)]))
    fitted = replace(row, per_token_s=x[len(kinds)], per_vocab_s=x[len(kinds) + 1], source=source or "fitted")
    return Calibration(device=device, efficiency=(fitted,), cpu_cycles={isa: cycles}, source=source)
