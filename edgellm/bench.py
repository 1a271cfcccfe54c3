"""Measure a model on this machine: load time, time to first token, prefill and decode speed, peak memory.

Each repetition starts from an empty KV cache, feeds a prompt of exactly ``prompt_tokens`` tokens (BOS
plus the shipped evaluation text, repeated if needed) and generates up to ``gen_tokens`` greedily. One
short untimed warm-up run comes first (it pages in the weights and lets llama.cpp build its graphs). The
reported speeds are medians over the repetitions; every run is kept in ``runs``.

Peak RSS is the process's high-water mark (``VmHWM``). On Linux it is reset after loading the runtime
module and before loading the model, so it covers load plus benchmark (``peak_rss_scope`` "bench");
where it cannot be reset it is the whole process's peak so far ("process").

When the bundle's manifest carries predictions from ``edgellm fit`` (``plan.speed.decode_tokens_per_s``,
``plan.memory.total_bytes``) they are set beside the measurements; a plain model file has none, and
``predictions_note`` says so.
"""

from __future__ import annotations

import logging
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from edgellm import bundle as bundles
from edgellm.errors import ContextOverflowError, SettingsError

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_TOKENS = 128
DEFAULT_GEN_TOKENS = 64
DEFAULT_REPEAT = 3
WARMUP_PROMPT_TOKENS, WARMUP_GEN_TOKENS = 8, 2
PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
CLEAR_PEAK_RSS = "5"          # writing this to clear_refs resets VmHWM (Linux >= 4.0, proc(5))

# Predictions from the manifest: (name, key path under the manifest, BenchResult field it is compared with)
PREDICTIONS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("decode_tokens_per_s", ("plan", "speed", "decode_tokens_per_s"), "decode_tokens_per_s"),
    ("memory_total_bytes", ("plan", "memory", "total_bytes"), "peak_rss_bytes"),
)


@dataclass(frozen=True)
class BenchRun:
    """One timed repetition."""

    prompt_tokens: int
    generated_tokens: int
    ttft_seconds: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    drafted_tokens: int = 0       # early exit: draft tokens proposed / accepted in this run
    accepted_tokens: int = 0


@dataclass(frozen=True)
class Prediction:
    """A figure the bundle's plan predicted, next to what was measured (ratio = measured / predicted)."""

    name: str
    predicted: float
    measured: float
    ratio: float


@dataclass(frozen=True)
class BenchResult:
    model_path: str
    backend: str
    n_ctx: int
    n_threads: int
    n_threads_batch: int
    threads_source: str           # "tuned", "cached", "override" or "manifest"
    prompt_tokens: int
    gen_tokens: int               # asked for; runs say how many were generated
    repeat: int
    load_seconds: float
    ttft_seconds: float           # medians over the runs
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    rss_after_load_bytes: int
    peak_rss_bytes: int
    peak_rss_scope: str           # "bench" (reset before loading) or "process"
    runs: tuple[BenchRun, ...]
    predictions: tuple[Prediction, ...] = ()
    predictions_note: str | None = None
    early_exit: str = "off"                  # the runtime's early-exit mode (edgellm.early_exit)
    acceptance_rate: float | None = None     # accepted / drafted tokens over the runs; None when nothing was drafted

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Peak memory

def reset_peak_rss() -> bool:
    """Reset the process's peak RSS where the OS allows it (Linux). Returns whether it was reset."""
    try:
        PROC_CLEAR_REFS.write_text(CLEAR_PEAK_RSS)
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak resident set size in bytes (VmHWM on Linux, ru_maxrss elsewhere)."""
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024      # the file gives kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024   # macOS reports bytes, Linux kilobytes


# ---------------------------------------------------------------------------------------------------------
# Predictions from a bundle's manifest

def _lookup(data: Mapping[str, Any], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        if not isinstance(data, Mapping) or key not in data:
            return None
        data = data[key]
    return float(data) if isinstance(data, (int, float)) and not isinstance(data, bool) else None


def manifest_predictions(path: str | Path) -> tuple[dict[str, float], str | None]:
    """(prediction name -> predicted value, note) for the bundle or model file at ``path``.

    The note says why there are none (a plain model file, or a manifest without a plan).
    """
    resolved = bundles.resolve(path)
    if resolved.manifest is None:
        return {}, f"{Path(path).name} is a plain model file: no predictions to compare with (bundles made " \
                   f"by `edgellm fit` carry them)"
    found = {name: value for name, keys, _ in PREDICTIONS
             if (value := _lookup(resolved.manifest.extra, keys)) is not None}
    if not found:
        return {}, "the bundle's manifest carries no plan.speed / plan.memory predictions"
    return found, None


def compare(predicted: Mapping[str, float], measured: Mapping[str, float]) -> tuple[Prediction, ...]:
    """Pair each prediction with its measurement (see PREDICTIONS)."""
    pairs = []
    for name, _, field_name in PREDICTIONS:
        if name in predicted:
            value = measured[field_name]
            pairs.append(Prediction(name, predicted[name], value,
                                    value / predicted[name] if predicted[name] else float("nan")))
    return tuple(pairs)


# ---------------------------------------------------------------------------------------------------------
# The benchmark

def bench_prompt(runtime: Any, n_tokens: int) -> list[int]:
    """Exactly ``n_tokens`` prompt ids: BOS (if the model uses one) then the evaluation text, repeated."""
    from edgellm.evaluate import default_text

    prefix = runtime.tokenize("", add_special=True)
    text = runtime.tokenize(default_text(), add_special=False)
    needed = n_tokens - len(prefix)
    return (prefix + text * (needed // len(text) + 1))[:n_tokens]


def _timed_run(runtime: Any, prompt: list[int], gen_tokens: int) -> BenchRun:
    runtime.reset()                      # no prompt reuse: every run prefills the whole prompt
    stats = runtime.generate(prompt, max_tokens=gen_tokens, temperature=0.0).stats
    if stats.generated_tokens < gen_tokens:
        logger.warning("the model ended after %d of %d tokens: decode speed is over fewer steps",
                       stats.generated_tokens, gen_tokens)
    return BenchRun(stats.prompt_tokens, stats.generated_tokens, stats.ttft_seconds,
                    stats.prefill_tokens_per_s, stats.decode_tokens_per_s, stats.drafted_tokens, stats.accepted_tokens)


def _check_args(prompt_tokens: int, gen_tokens: int, repeat: int) -> None:
    for name, value, low in (("prompt_tokens", prompt_tokens, 2), ("gen_tokens", gen_tokens, 2),
                             ("repeat", repeat, 1)):
        if not isinstance(value, int) or value < low:
            raise SettingsError(name, repr(value), f"must be an integer >= {low}")


def bench(path: str | Path, *, prompt_tokens: int = DEFAULT_PROMPT_TOKENS, gen_tokens: int = DEFAULT_GEN_TOKENS,
          n_ctx: int | None = None, n_threads: int | None = None, repeat: int = DEFAULT_REPEAT,
          provider: str | None = None, early_exit: str | None = None) -> BenchResult:
    """Load the bundle or model at ``path`` and measure it (see the module docstring). ``provider``: the ONNX
    Runtime execution provider for ONNX models (``Runtime.load``'s).

    Raises:
        SettingsError: prompt_tokens or gen_tokens below 2, repeat below 1.
        ContextOverflowError: prompt_tokens + gen_tokens do not fit the context.
        EdgeLLMError: the model cannot be loaded (ModelLoadError, BundleError, ...).
    """
    from edgellm.runtime import Runtime

    _check_args(prompt_tokens, gen_tokens, repeat)
    predicted, note = manifest_predictions(path)
    scope = "bench" if reset_peak_rss() else "process"
    with Runtime.load(path, n_ctx=n_ctx, n_threads=n_threads, provider=provider, early_exit=early_exit) as runtime:
        info = runtime.info
        if prompt_tokens + gen_tokens > info.n_ctx:
            raise ContextOverflowError(prompt_tokens + gen_tokens, info.n_ctx,
                                       "the benchmark prompt + generated tokens")
        _timed_run(runtime, bench_prompt(runtime, WARMUP_PROMPT_TOKENS), WARMUP_GEN_TOKENS)
        prompt = bench_prompt(runtime, prompt_tokens)
        runs = tuple(_timed_run(runtime, prompt, gen_tokens) for _ in range(repeat))
        peak = peak_rss_bytes()
    measured = {"ttft_seconds": statistics.median(r.ttft_seconds for r in runs),
                "prefill_tokens_per_s": statistics.median(r.prefill_tokens_per_s for r in runs),
                "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in runs),
                "peak_rss_bytes": peak}
    return BenchResult(model_path=info.model_path, backend=info.backend, n_ctx=info.n_ctx, n_threads=info.n_threads,
                       n_threads_batch=info.n_threads_batch, threads_source=info.threads_source,
                       prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repeat=repeat,
                       load_seconds=info.load_seconds, rss_after_load_bytes=info.rss_after_load_bytes,
                       peak_rss_scope=scope, runs=runs, predictions=compare(predicted, measured),
                       predictions_note=note, early_exit=info.early_exit,
                       acceptance_rate=_acceptance(runs), **measured)


def _acceptance(runs: tuple[BenchRun, ...]) -> float | None:
    drafted = sum(r.drafted_tokens for r in runs)
    return sum(r.accepted_tokens for r in runs) / drafted if drafted else None


# ---------------------------------------------------------------------------------------------------------
# Calibrating the speed model of `edgellm fit --device local`

@dataclass(frozen=True)
class CalibrationPoint:
    """One calibration measurement: decode tok/s at ``threads`` (fastest run) and what the fitted
    calibration predicts for it."""

    threads: int
    measured_tokens_per_s: float
    predicted_tokens_per_s: float


@dataclass(frozen=True)
class CalibrationResult:
    path: str                     # the calibration file written
    device: str                   # profile id it belongs to ("local")
    points: tuple[CalibrationPoint, ...]
    n_samples: int                # samples the calibration is fitted to (earlier models' included)
    calibration: dict[str, Any]   # Calibration.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibration_threads(planned: int) -> tuple[int, ...]:
    """Thread counts to measure: one and the count fit plans (two counts separate the per-thread kernel
    cost from the fixed cost per token)."""
    return tuple(sorted({1, max(planned, 1)}))


def calibrate(path: str | Path, *, threads: tuple[int, ...] | None = None,
              prompt_tokens: int = DEFAULT_PROMPT_TOKENS, gen_tokens: int = DEFAULT_GEN_TOKENS,
              repeat: int = DEFAULT_REPEAT, calibration_file: str | Path | None = None) -> CalibrationResult:
    """Measure decode speed of the GGUF (or GGUF bundle) at ``path`` on this machine at each thread count
    (default: 1 and the decode threads fit plans) and fit the speed model that ``edgellm fit --device local``
    uses (``edgellm.fitting.calibration``; the file keeps the samples, so calibrating with more models refines
    it). The fastest of the ``repeat`` runs counts: other processes only ever slow a run down.

    Returns a ``CalibrationResult`` (the file written, measured and re-predicted speeds).

    Raises:
        UsageError: the model is not a GGUF (the speed model's calibration is llama.cpp's).
        SettingsError, ContextOverflowError, EdgeLLMError: as ``bench``.
    """
    from edgellm.errors import UsageError
    from edgellm.fitting.calibration import predict, sample_from_facts, update_calibration
    from edgellm.fitting.candidates import threads as planned_threads
    from edgellm.fitting.inspect import inspect_model
    from edgellm.fitting.speed import device_facts
    from edgellm.fitting.tables import builtin_tables
    from edgellm.targets import resolve_device

    resolved = bundles.resolve(path)
    if resolved.model_path.suffix.lower() != ".gguf":
        raise UsageError(problem=f"{resolved.model_path.name} is not a GGUF file: the speed calibration is "
                                 "llama.cpp's", hint_text="calibrate with a .gguf model or bundle")
    profile = resolve_device("local").profile
    facts = inspect_model(resolved.model_path, exact=False)
    types = {t.name: t.type for t in facts.tensors}
    kv_type = resolved.manifest.runtime.kv_type if resolved.manifest else "f16"
    depth = prompt_tokens + gen_tokens // 2          # mean context depth while decoding
    samples, runs = [], []
    for n in threads or calibration_threads(planned_threads(profile)[0]):
        result = bench(path, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, n_threads=n, repeat=repeat)
        fastest = max(r.decode_tokens_per_s for r in result.runs)
        samples.append(sample_from_facts(facts, types, threads=n, n_ctx=result.n_ctx, kv_type=kv_type or "f16",
                                         depth=depth, tokens_per_s=fastest, model=str(resolved.model_path.resolve())))
        runs.append((n, fastest))
    source = f"edgellm bench --calibrate {time.strftime('%Y-%m-%d')}"
    calibration, merged, written = update_calibration(
        samples, profile, base=builtin_tables().speed,
        path=Path(calibration_file) if calibration_file else None, source=source)
    dev = device_facts(profile, 1)
    points = tuple(CalibrationPoint(n, tps, predict(calibration, s, dev)) for (n, tps), s in zip(runs, samples))
    return CalibrationResult(path=str(written), device=profile.id, points=points, n_samples=len(merged),
                             calibration=calibration.to_dict())
