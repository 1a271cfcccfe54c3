"""Measure what a plan predicts: peak resident memory and decode speed of a real generation (I/O).

``measure(path)`` runs the edgellm runtime in a fresh child process (so the peak belongs to one model and
nothing else), fills the context with a prompt, generates, and reports the process's peak RSS (Linux
``VmHWM``) and the runtime's own prefill and decode rates. Used by the accuracy tests, by
``benchmarks/fit_accuracy.py`` and to calibrate the speed model on a device.

Run as a module it is that child: ``python -m edgellm.fitting.measure PATH --n-ctx N`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from edgellm.errors import MeasureError

TEXT = "calibration.txt"       # prompt source (edgellm/data), repeated as needed
HEADROOM_TOKENS = 8            # context cells left free after prompt and generation
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4   # <sys/mman.h> mlockall flags (Linux)
DEFAULT_TIMEOUT_S = 900


@dataclass(frozen=True)
class Measurement:
    """One measured generation."""

    peak_rss_bytes: int
    rss_after_load_bytes: int
    rss_anon_bytes: int           # at the end: anonymous memory (heap, buffers)
    rss_file_bytes: int           # at the end: file-backed pages (mapped weights, libraries)
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    n_ctx: int
    prompt_tokens: int
    generated_tokens: int
    n_threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def _status_bytes(key: str) -> int:
    """A ``/proc/self/status`` memory line (kB) in bytes."""
    with open("/proc/self/status", encoding="ascii") as f:
        line = next(l for l in f if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def prompt_ids(runtime, n_tokens: int) -> list[int]:
    """``n_tokens`` token ids of the bundled calibration text (repeated when the text is shorter)."""
    text = resources.files("edgellm").joinpath("data", TEXT).read_text(encoding="utf-8")
    ids = runtime.tokenize(text)
    while len(ids) < n_tokens:
        ids += runtime.tokenize(text, add_special=False)
    return ids[:n_tokens]


def lock_touched_pages() -> bool:
    """Keep every page this process touches resident (``mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)``:
    nothing is pre-faulted), so the kernel's proactive reclaim (DAMON pageout, THP shrinking) cannot hide
    part of the working set from VmHWM. Returns False where the OS refuses (then RSS may read low)."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) == 0


def run_child(path: str, n_ctx: int | None, max_tokens: int, prompt_tokens: int | None,
              n_threads: int | None = None, temperature: float = 0.0) -> Measurement:
    """The measurement itself, in this process: load, fill the context, generate (greedy by default)."""
    from edgellm.runtime import GenerationSettings, Runtime

    runtime = Runtime.load(path, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads)
    room = runtime.info.n_ctx - max_tokens - HEADROOM_TOKENS
    n = room if prompt_tokens is None else min(prompt_tokens, room)
    settings = GenerationSettings(max_tokens=max_tokens, temperature=temperature, top_p=0.95 if temperature else 1.0,
                                  seed=0)
    completion = runtime.generate(prompt_ids(runtime, max(n, 1)), settings)
    stats = completion.stats
    return Measurement(peak_rss_bytes=_status_bytes("VmHWM"), rss_after_load_bytes=runtime.info.rss_after_load_bytes,
                       rss_anon_bytes=_status_bytes("RssAnon"), rss_file_bytes=_status_bytes("RssFile"),
                       decode_tokens_per_s=stats.decode_tokens_per_s, prefill_tokens_per_s=stats.prefill_tokens_per_s,
                       n_ctx=runtime.info.n_ctx, prompt_tokens=stats.prompt_tokens,
                       generated_tokens=stats.generated_tokens, n_threads=runtime.info.n_threads)


def measure(path: str | Path, *, n_ctx: int | None = None, max_tokens: int = 64, prompt_tokens: int | None = None,
            n_threads: int | None = None, temperature: float = 0.0, timeout_s: float = DEFAULT_TIMEOUT_S) -> Measurement:
    """Peak RSS and speeds of generating ``max_tokens`` after a prompt that fills the context.

    ``path`` is a bundle folder or a GGUF file; ``n_ctx`` and ``n_threads`` override the bundle's settings
    (a plain file without ``n_threads`` gets the runtime's thread tuning). Linux only (VmHWM).

    Raises:
        MeasureError: the child failed or timed out (its stderr tail is in the message).
    """
    command = [sys.executable, "-m", "edgellm.fitting.measure", str(path), "--max-tokens", str(max_tokens)]
    command += ["--n-ctx", str(n_ctx)] if n_ctx else []
    command += ["--prompt-tokens", str(prompt_tokens)] if prompt_tokens is not None else []
    command += ["--threads", str(n_threads)] if n_threads else []
    command += ["--temperature", str(temperature)] if temperature else []
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise MeasureError(path=str(path), problem=f"no result within {timeout_s:.0f} s") from None
    if done.returncode != 0:
        raise MeasureError(path=str(path), problem=done.stderr.strip()[-500:] or f"exit code {done.returncode}")
    return Measurement(**json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgellm.fitting.measure")
    parser.add_argument("path")
    parser.add_argument("--n-ctx", type=int)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--temperature", type=float, default=0.0, help="sample (top_p 0.95) instead of greedy")
    parser.add_argument("--no-lock", action="store_true", help="do not mlock touched pages")
    args = parser.parse_args(argv)
    if not args.no_lock and not lock_touched_pages():
        print("warning: mlockall refused; proactive reclaim may lower the measured peak", file=sys.stderr)
    result = run_child(args.path, args.n_ctx, args.max_tokens, args.prompt_tokens, args.threads, args.temperature)
    print(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
