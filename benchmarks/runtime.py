"""Runtime benchmark, run by hand: our runtime beside plain llama-cpp-python on the same file, in one run.

    .venv/bin/python benchmarks/runtime.py [--model FILE.gguf] [--tokens 64] [--rounds 5]

Prints three tables (ratios are what to read; absolute times drift on a shared machine):
1. decode tok/s, ours vs llama-cpp-python, same file, same threads, greedy, alternating runs;
2. thread tuning: the counts our tuner picks (and what it costs) vs an exhaustive sweep of decode speed;
3. load time (cold: file evicted from the page cache first; warm) and RSS after load, each in a fresh process,
   ours vs llama-cpp-python with its defaults.
Default model: Gemma 3 270M Q4_K_M from the [demo] extra.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

PROMPT = "Write a short paragraph about why the sky is blue."


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache, so the next load reads the disk (a cold load)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _ours_decode(rt, n_tokens: int) -> float:
    rt.reset()
    return rt.generate(PROMPT, max_tokens=n_tokens, temperature=0.0).stats.decode_tokens_per_s


def _plain_decode(llm, n_tokens: int) -> float:
    llm.reset()
    start = None
    count = 0
    for _ in llm.create_completion(PROMPT, max_tokens=n_tokens, temperature=0.0, stream=True):
        count += 1
        if start is None:           # the first chunk ends prefill; decode speed is measured after it
            start = time.perf_counter()
    return (count - 1) / (time.perf_counter() - start)


def decode_table(model: Path, threads: int, n_tokens: int, rounds: int) -> list[tuple]:
    import llama_cpp
    from edgellm.runtime import Runtime

    rt = Runtime.load(model, n_ctx=512, n_threads=threads, n_threads_batch=threads)
    llm = llama_cpp.Llama(str(model), n_ctx=512, n_threads=threads, n_threads_batch=threads,
                          flash_attn=False, verbose=False)
    ours, plain = [], []
    for _ in range(rounds):                       # alternate so drift hits both alike
        ours.append(_ours_decode(rt, n_tokens))
        plain.append(_plain_decode(llm, n_tokens))
    rt.close()
    llm.close()
    a, b = statistics.median(ours), statistics.median(plain)
    return [("decode tok/s (median of %d)" % rounds, f"{a:.1f}", f"{b:.1f}", f"{a / b:.3f}")]


def threads_table(model: Path, rounds: int) -> list[tuple]:
    from edgellm.runtime import Runtime
    from edgellm.runtime import threads as tuning

    rt = Runtime.load(model, n_ctx=512, n_threads=1, n_threads_batch=1)
    choice = tuning.tune(rt.backend)
    sweep = {}
    for n in range(1, (os.cpu_count() or 1) + 1):
        rt.backend.set_threads(n, n)
        sweep[n] = statistics.median(_ours_decode(rt, 48) for _ in range(rounds))
    rt.close()
    best = max(sweep, key=sweep.get)
    rows = [(f"sweep: {n} thread(s)", f"{s:.1f} tok/s", "") for n, s in sorted(sweep.items())]
    rows.append(("tuned decode threads", f"{choice.n_threads}", f"{sweep[choice.n_threads] / sweep[best]:.3f} of best"))
    rows.append(("tuned batch threads", f"{choice.n_threads_batch}", ""))
    rows.append(("tuning cost", f"{choice.seconds:.2f} s", ""))
    return rows


def _load_child(kind: str, model: str, queue: mp.Queue) -> None:
    import psutil

    start = time.perf_counter()
    if kind == "ours":
        from edgellm.runtime import Runtime
        handle = Runtime.load(model, n_ctx=512, n_threads=1, n_threads_batch=1)   # threads given: no tuning
    else:
        import llama_cpp
        handle = llama_cpp.Llama(model, verbose=False)                         # its defaults (n_ctx 512)
    seconds = time.perf_counter() - start
    queue.put((seconds, psutil.Process().memory_info().rss))
    handle.close()


def _load_once(kind: str, model: Path, cold: bool) -> tuple[float, int]:
    if cold:
        evict(model)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_load_child, args=(kind, str(model), queue))
    child.start()
    result = queue.get(timeout=300)
    child.join()
    return result


def load_table(model: Path, rounds: int) -> list[tuple]:
    rows = []
    for cold in (True, False):
        label = "cold" if cold else "warm"
        ours = [_load_once("ours", model, cold) for _ in range(rounds)]
        plain = [_load_once("plain", model, cold) for _ in range(rounds)]
        t_ours, t_plain = statistics.median(s for s, _ in ours), statistics.median(s for s, _ in plain)
        r_ours, r_plain = statistics.median(r for _, r in ours), statistics.median(r for _, r in plain)
        rows.append((f"{label} load s", f"{t_ours:.3f}", f"{t_plain:.3f}", f"{t_ours / t_plain:.3f}"))
        rows.append((f"{label} RSS after load MB", f"{r_ours / 1e6:.0f}", f"{r_plain / 1e6:.0f}",
                     f"{r_ours / r_plain:.3f}"))
    return rows


def print_table(title: str, headers: tuple, rows: list[tuple]) -> None:
    from edgellm.cli.output import table

    print(f"\n## {title}\n")
    print(table(headers, rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a GGUF file (default: Gemma 3 270M Q4_K_M)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if args.model is None:
        from edgellm.testing.gemma import gguf_path
        args.model = gguf_path()
    print(f"model {args.model} ({args.model.stat().st_size / 1e6:.0f} MB), {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print_table(f"Decode, {args.threads} threads, {args.tokens} tokens", ("", "edgellm", "llama-cpp-python", "ratio"),
                decode_table(args.model, args.threads, args.tokens, args.rounds))
    print_table("Thread tuning vs exhaustive sweep", ("", "value", "vs best"), threads_table(args.model, 3))
    print_table("Load (fresh process each)", ("", "edgellm", "llama-cpp-python", "ratio"),
                load_table(args.model, 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
