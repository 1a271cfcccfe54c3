"""Thread counts: measured once per machine and model file, then cached.

One-token decode is bound by memory bandwidth and stops scaling early (often below the physical core
count; efficiency cores can slow it down), while prompt processing is compute-bound and likes every core.
So the two counts are chosen separately, by a short timing of a few candidate counts on the loaded model
(under TUNE_BUDGET_S), and the result is cached in ``$XDG_CACHE_HOME/edgellm/threads.json``
(``~/.cache`` by default) under a key of the machine and the model file (path, size, mtime).

A backend whose ``separate_batch_threads`` is False (ONNX Runtime: one intra-op pool, fixed when its session
is created, so every count tried costs a new session) gets one count for both, chosen by decode speed.
Timing runs never pass the backend's context: a tiny ``n_ctx`` shortens the batches and decode steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from edgellm.runtime.base import Backend

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
TUNE_BUDGET_S = 1.5            # seconds of timing runs; the probe and a warm-up (~0.5 s) come on top
ROUNDS = 3                     # each candidate is timed this many times, interleaved; the best run counts
MIN_DECODE_STEPS, MAX_DECODE_STEPS = 2, 16
MIN_BATCH_TOKENS, MAX_BATCH_TOKENS = 16, 128
FEWER_IS_AS_GOOD = 0.99        # a smaller count within 1% of the fastest wins (less power, less contention)
SAMPLE_TEXT = "The quick brown fox jumps over the lazy dog while the model is timed on this machine. "

SOURCES = ("tuned", "cached", "override", "manifest")


@dataclass(frozen=True)
class CoreCounts:
    physical: int
    logical: int
    performance: int           # physical cores of the fastest cluster (= physical on a uniform CPU)


@dataclass(frozen=True)
class ThreadChoice:
    n_threads: int             # for one-token decode steps
    n_threads_batch: int       # for prompt processing and multi-token batches
    source: str                # one of SOURCES
    decode_tokens_per_s: dict[int, float] = field(default_factory=dict)    # thread count -> measured speed
    prefill_tokens_per_s: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0       # time the measurement took


# --- which counts to try (pure) ---

def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))      # honours taskset and container CPU sets
    except AttributeError:                       # macOS, Windows
        return os.cpu_count() or 1


def core_counts() -> CoreCounts:
    """Cores of this machine: from edgellm.probe when installed (it knows big.LITTLE and P/E clusters),
    else psutil; capped to the CPUs this process may run on."""
    usable = _usable_cpus()
    try:
        from edgellm.probe import probe
        cpu = probe().cpu
        physical, logical = cpu.physical_cores, cpu.logical_cores
        performance = cpu.clusters[0].physical_cores if len(cpu.clusters) > 1 else physical
    except ImportError:
        import psutil
        logical = psutil.cpu_count(logical=True) or usable
        physical = psutil.cpu_count(logical=False) or logical
        performance = physical
    logical = max(1, min(logical, usable))
    physical = max(1, min(physical, logical))
    return CoreCounts(physical=physical, logical=logical, performance=max(1, min(performance, physical)))


def core_counts_quick() -> tuple[int, int]:
    """(physical, logical) cores from psutil, capped to usable CPUs: starting counts before any tuning."""
    import psutil
    logical = max(1, min(psutil.cpu_count(logical=True) or 1, _usable_cpus()))
    return max(1, min(psutil.cpu_count(logical=False) or logical, logical)), logical


def decode_candidates(cores: CoreCounts) -> list[int]:
    """Counts worth timing for decode: performance cores, all physical cores, and fewer."""
    perf = cores.performance
    return sorted({perf, cores.physical, max(1, perf - 1), max(1, perf // 2)})


def batch_candidates(cores: CoreCounts) -> list[int]:
    """Counts worth timing for prompt processing: every logical CPU, physical cores, performance cores, and
    half of those (a busy machine punishes threads that wait on each other)."""
    return sorted({cores.logical, cores.physical, cores.performance, max(1, cores.performance // 2)})


def pick(speeds: dict[int, float]) -> int:
    """The fastest count, preferring a smaller one that is within FEWER_IS_AS_GOOD of it."""
    best = max(speeds.values())
    return min(n for n, s in speeds.items() if s >= FEWER_IS_AS_GOOD * best)


# --- timing on the loaded model ---

def separate_pools(backend: Backend) -> bool:
    """Whether ``backend`` runs prompt batches on a thread pool of its own (llama.cpp: yes)."""
    return bool(getattr(backend, "separate_batch_threads", True))


@dataclass(frozen=True)
class RunSizes:
    """Lengths of the timing runs, bounded by the backend's context (tokens)."""

    chunk: int                 # tokens per batch call (and the prefix decode steps start from)
    batch_tokens: int          # tokens of one batch timing run
    decode_steps: int          # one-token steps of one decode timing run


def run_sizes(n_ctx: int, per_step_s: float, per_batch_token_s: float, trial_s: float) -> RunSizes:
    """Run lengths that take about ``trial_s`` each, within [MIN, MAX] and within ``n_ctx`` (pure)."""
    chunk = max(1, min(MIN_BATCH_TOKENS, n_ctx // 2))
    steps = int(min(MAX_DECODE_STEPS, max(MIN_DECODE_STEPS, trial_s / max(per_step_s, 1e-6))))
    tokens = int(min(MAX_BATCH_TOKENS, max(MIN_BATCH_TOKENS, trial_s / max(per_batch_token_s, 1e-6))))
    return RunSizes(chunk, max(1, min(tokens, n_ctx)), max(1, min(steps, n_ctx - chunk)))


def _sample_tokens(backend: Backend, n: int) -> list[int]:
    ids = backend.tokenize(SAMPLE_TEXT, add_special=False, parse_special=False)
    return (ids * (n // max(len(ids), 1) + 1))[:n]


def _time_decode(backend: Backend, prefix: int, token: int, steps: int, limit_s: float,
                 clock: Callable[[], float]) -> float:
    """Seconds per one-token decode step from position ``prefix``: up to ``steps`` steps, fewer once
    ``limit_s`` has passed (a count that is slow under contention must not eat the budget)."""
    backend.truncate(prefix)
    start = clock()
    done = 0
    while done < steps and (done == 0 or clock() - start < limit_s):
        backend.decode([token], "last")
        done += 1
    return (clock() - start) / done


def _time_batch(backend: Backend, tokens: list[int], limit_s: float, clock: Callable[[], float],
                chunk: int = MIN_BATCH_TOKENS) -> float:
    """Seconds per token to process ``tokens`` from an empty cache, in batches of ``chunk``; stops
    early once ``limit_s`` has passed."""
    backend.truncate(0)
    start = clock()
    done = 0
    while done < len(tokens) and (done == 0 or clock() - start < limit_s):
        backend.decode(tokens[done:done + chunk], "last")
        done += len(tokens[done:done + chunk])
    return (clock() - start) / done


def measure(backend: Backend, decode_counts: Sequence[int], batch_counts: Sequence[int], *,
            budget_s: float = TUNE_BUDGET_S, rounds: int = ROUNDS,
            clock: Callable[[], float] = time.perf_counter) -> tuple[dict[int, float], dict[int, float]]:
    """Time decode (tokens/s) for each of ``decode_counts`` and prompt processing for ``batch_counts``.

    Runs are interleaved over up to ``rounds`` rounds and the best run of each count is kept (other
    processes only ever slow a run down). Run sizes come from a warm-up so that the rounds fit
    ``budget_s``; later rounds are skipped once it is spent. A list of one count is not timed.
    Leaves the KV cache empty.
    """
    start = clock()
    n_decode, n_batch = max(decode_counts), max(batch_counts)
    tokens = _sample_tokens(backend, MAX_BATCH_TOKENS)
    # Warm-up: the first pass faults the memory-mapped weights in; it also sizes the runs. Fewest threads:
    # on a busy machine the most threads can be many times slower.
    backend.set_threads(min(decode_counts), min(batch_counts))
    chunk = run_sizes(backend.n_ctx, 0.0, 0.0, 0.0).chunk
    per_batch_token = _time_batch(backend, tokens[:chunk], 0.0, clock, chunk)
    per_step = _time_decode(backend, chunk, tokens[0], 1, 0.0, clock)
    trial_s = budget_s / 2 / rounds / max(len(decode_counts), len(batch_counts))
    sizes = run_sizes(backend.n_ctx, per_step, per_batch_token, trial_s)
    steps, n_tokens = sizes.decode_steps, sizes.batch_tokens
    decode = dict.fromkeys(decode_counts if len(decode_counts) > 1 else (), 0.0)
    batch = dict.fromkeys(batch_counts if len(batch_counts) > 1 else (), 0.0)
    for round_ in range(rounds):
        if round_ and clock() - start > budget_s:
            break
        for n in decode:
            if round_ and clock() - start > budget_s:
                break
            backend.set_threads(n, n_batch)
            seconds = _time_decode(backend, chunk, tokens[0], steps, trial_s, clock)
            decode[n] = max(decode[n], 1.0 / seconds)
        for n in batch:
            if round_ and clock() - start > budget_s:
                break
            backend.set_threads(n_decode, n)
            batch[n] = max(batch[n], 1.0 / _time_batch(backend, tokens[:n_tokens], trial_s, clock, chunk))
    backend.truncate(0)
    return decode, batch


def tune(backend: Backend, cores: CoreCounts | None = None, *, budget_s: float = TUNE_BUDGET_S,
         clock: Callable[[], float] = time.perf_counter) -> ThreadChoice:
    """Choose decode and batch thread counts for ``backend`` by timing the candidates; applies them.
    A backend with one pool (``separate_pools`` False) gets the decode choice for both."""
    start = clock()
    cores = cores or core_counts()
    decode_counts, batch_counts = decode_candidates(cores), batch_candidates(cores)
    if not separate_pools(backend):
        batch_counts = decode_counts[:1]              # one count: not timed
    decode, batch = measure(backend, decode_counts, batch_counts, budget_s=budget_s, clock=clock)
    n_decode = pick(decode) if decode else decode_counts[0]
    choice = ThreadChoice(n_threads=n_decode,
                          n_threads_batch=(pick(batch) if batch else batch_counts[0]) if separate_pools(backend)
                          else n_decode, source="tuned",
                          decode_tokens_per_s=decode, prefill_tokens_per_s=batch, seconds=clock() - start)
    backend.set_threads(choice.n_threads, choice.n_threads_batch)
    logger.info("threads tuned in %.2f s: decode %d %s, batch %d %s", choice.seconds, choice.n_threads,
                _fmt(decode), choice.n_threads_batch, _fmt(batch))
    return choice


def _fmt(speeds: dict[int, float]) -> str:
    return "(" + ", ".join(f"{n}: {s:.1f} tok/s" for n, s in sorted(speeds.items())) + ")"


# --- the cache ---

def cache_path() -> Path:
    """``$XDG_CACHE_HOME/edgellm/threads.json``, ``~/.cache/edgellm/threads.json`` by default."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgellm" / "threads.json"


def machine_id() -> str:
    """A short id of this machine as thread tuning sees it (host, CPU model and usable CPUs)."""
    parts = (platform.node(), platform.machine(), platform.processor(), _cpu_model(), str(_usable_cpus()))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        return ""


def cache_key(model_path: str | Path) -> str:
    """Key of (machine, model file): the file's resolved path, size and modification time."""
    path = Path(model_path).resolve()
    stat = path.stat()
    return f"{machine_id()}|{path}|{stat.st_size}|{stat.st_mtime_ns}"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data.get("entries", {}) if isinstance(data, dict) and data.get("version") == CACHE_VERSION else {}


def load_cached(key: str) -> ThreadChoice | None:
    """The cached choice for ``key``, marked source "cached"; None if absent or unreadable."""
    entry = _read_cache(cache_path()).get(key)
    try:
        return ThreadChoice(n_threads=int(entry["n_threads"]), n_threads_batch=int(entry["n_threads_batch"]),
                            source="cached",
                            decode_tokens_per_s={int(k): v for k, v in entry.get("decode_tokens_per_s", {}).items()},
                            prefill_tokens_per_s={int(k): v for k, v in entry.get("prefill_tokens_per_s", {}).items()},
                            seconds=float(entry.get("seconds", 0.0)))
    except (TypeError, KeyError, ValueError, AttributeError):
        return None


def store(key: str, choice: ThreadChoice) -> None:
    """Add ``choice`` to the cache file (atomically). A cache that cannot be written is only logged."""
    path = cache_path()
    entries = _read_cache(path)
    entries[key] = {k: v for k, v in asdict(choice).items() if k != "source"}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".threads.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump({"version": CACHE_VERSION, "entries": entries}, out, indent=1)
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("could not write the thread cache %s: %s", path, exc)


# --- the decision ---

def choose(backend: Backend, model_path: str | Path, *, n_threads: int | None = None,
           n_threads_batch: int | None = None,
           manifest_threads: tuple[int | None, int | None] = (None, None)) -> ThreadChoice:
    """Thread counts for a freshly loaded ``backend``, applied to it.

    Order: explicit ``n_threads``/``n_threads_batch`` ("override"; ``n_threads`` alone sets both, as
    ``--threads-batch`` defaults to ``--threads``; ``n_threads_batch`` alone takes the decode count from
    below), then the bundle manifest's ("manifest"), then the cache ("cached"), then a measurement
    ("tuned", stored in the cache). A one-pool backend (``separate_pools`` False) runs batches with the
    decode count, and the choice says so.
    """
    if n_threads is not None:
        choice = ThreadChoice(n_threads, n_threads_batch or n_threads, "override")
    else:
        base = _base_choice(backend, model_path, manifest_threads)
        choice = base if n_threads_batch is None else ThreadChoice(base.n_threads, n_threads_batch, "override")
    if not separate_pools(backend) and choice.n_threads_batch != choice.n_threads:
        logger.info("%s runs prompt batches on its decode threads: %d, not %d", getattr(backend, "id", "the backend"),
                    choice.n_threads, choice.n_threads_batch)
        choice = dataclasses.replace(choice, n_threads_batch=choice.n_threads)
    backend.set_threads(choice.n_threads, choice.n_threads_batch)
    return choice


def _base_choice(backend: Backend, model_path: str | Path,
                 manifest_threads: tuple[int | None, int | None]) -> ThreadChoice:
    decode, batch = manifest_threads
    if decode is not None:
        return ThreadChoice(decode, batch or decode, "manifest")
    key = cache_key(model_path)
    cached = load_cached(key)
    if cached is not None:
        return cached
    choice = tune(backend)
    store(key, choice)
    return choice
