"""Decode speed and memory, side by side on one checkpoint (Gemma 3 270M by default):

* llama.cpp Q4_0 (GGUF) through our runtime loop,
* ONNX int4 (MatMulNBits, block 32, accuracy level 4) on the CPU through our runtime loop,
* the same ONNX folder through onnxruntime-genai's own generator loop.

Every case runs in its own process (peak RSS is a per-process high-water mark) with the same prompt ids,
thread count and context; cases are interleaved over ``--rounds`` rounds and the best decode speed of each
is kept (other load on the machine only ever slows a run down). Prints a Markdown table (``--json``: JSON).

    python benchmarks/onnx_decode.py [--checkpoint DIR] [--work DIR] [--threads N] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable


# case -> (artifact it runs, what the row is called)
CASES: dict[str, tuple[str, str]] = {
    "llama.cpp-q4_0": ("q4_0.gguf", "llama.cpp Q4_0, our loop"),
    "onnx-int4": ("onnx-int4/model.onnx", "ONNX int4 (CPU), our loop"),
    "onnx-int4-genai": ("onnx-int4", "ONNX int4 (CPU), onnxruntime-genai loop"),
}
N_CTX = 1024


# --- artifacts (parent process) ---

def build(checkpoint: Path, work: Path) -> None:
    """The Q4_0 GGUF and the int4 ONNX folder of ``checkpoint`` in ``work`` (skipped when present)."""
    from edgellm.converters import convert
    from edgellm.converters.onnx import convert_onnx

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "q4_0.gguf").is_file():
        convert(checkpoint, work / "q4_0.gguf", "q4_0")
    if not (work / "onnx-int4" / "model.onnx").is_file():
        convert_onnx(checkpoint, work / "onnx-int4", "int4", block_size=32)


def prompt_ids(work: Path, n: int) -> list[int]:
    """The first ``n`` tokens of the shipped evaluation text (BOS first), with the model's tokenizer."""
    from edgellm.evaluate import default_text
    from edgellm.runtime.onnx import OnnxBackend

    backend = OnnxBackend.load(work / "onnx-int4", n_ctx=16, n_threads=1)
    try:
        return backend.tokenize(default_text())[:n]
    finally:
        backend.close()


# --- one measurement (child process) ---

def _rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    """This process's peak resident memory. Linux: VmHWM of its own address space (ru_maxrss would also count
    the parent's memory at fork time, which Linux carries across exec)."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(l for l in status.read_text().splitlines() if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024       # ru_maxrss: bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_ours(path: Path, prompt: list[int], n_new: int, threads: int) -> dict[str, Any]:
    from edgellm.runtime import Runtime

    start = time.perf_counter()
    with Runtime.load(path, n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads) as runtime:
        loaded, rss = time.perf_counter() - start, _rss()
        stats = runtime.generate(prompt, max_tokens=n_new, temperature=0.0).stats
        return {"load_s": loaded, "rss_after_load": rss, "prefill_tok_s": stats.prefill_tokens_per_s,
                "decode_tok_s": stats.decode_tokens_per_s, "generated": stats.generated_tokens}


def run_genai(path: Path, prompt: list[int], n_new: int, threads: int) -> dict[str, Any]:
    import onnxruntime_genai as og

    start = time.perf_counter()
    config = og.Config(str(path))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads,
                                                                          "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    loaded, rss = time.perf_counter() - start, _rss()
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + n_new, repetition_penalty=1.0)
    generator = og.Generator(model, params)
    t0 = time.perf_counter()
    generator.append_tokens(prompt)
    generator.generate_next_token()                       # the first token comes from the prompt's logits
    t1 = time.perf_counter()
    steps = 0
    while not generator.is_done() and steps < n_new - 1:
        generator.generate_next_token()
        steps += 1
    t2 = time.perf_counter()
    return {"load_s": loaded, "rss_after_load": rss, "prefill_tok_s": len(prompt) / (t1 - t0),
            "decode_tok_s": steps / (t2 - t1) if steps else 0.0, "generated": steps + 1}


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "llama.cpp-q4_0": run_ours, "onnx-int4": run_ours, "onnx-int4-genai": run_genai,
}


def child(case: str, path: Path, prompt: list[int], n_new: int, threads: int) -> None:
    result = RUNNERS[case](path, prompt, n_new, threads)
    result["peak_rss"] = _peak_rss()
    print(json.dumps(result))


def measure(case: str, work: Path, prompt: list[int], n_new: int, threads: int) -> dict[str, Any]:
    """Run one case in a fresh interpreter; its last stdout line is the JSON result."""
    args = [sys.executable, __file__, "--child", case, "--work", str(work), "--new-tokens", str(n_new),
            "--threads", str(threads), "--prompt", json.dumps(prompt)]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- report ---

def machine() -> dict[str, Any]:
    import llama_cpp
    import onnxruntime
    try:
        import onnxruntime_genai
        genai = onnxruntime_genai.__version__
    except ImportError:
        genai = "not installed"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return {"cpu": cpu, "cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "onnxruntime_genai": genai,
            "llama_cpp_python": llama_cpp.__version__}


def _size(artifact: Path) -> int:
    """Bytes on disk: a GGUF file, or every file of an ONNX folder (weights, graph, tokenizer files)."""
    folder = artifact.parent if artifact.suffix == ".onnx" else artifact
    return sum(p.stat().st_size for p in folder.iterdir()) if folder.is_dir() else artifact.stat().st_size


def summarize(runs: dict[str, list[dict[str, Any]]], work: Path) -> dict[str, Any]:
    rows = {}
    for case, results in runs.items():
        decode = [r["decode_tok_s"] for r in results]
        size = _size(work / CASES[case][0])
        rows[case] = {"label": CASES[case][1], "decode_tok_s_best": max(decode),
                      "decode_tok_s_median": statistics.median(decode),
                      "prefill_tok_s_best": max(r["prefill_tok_s"] for r in results),
                      "peak_rss_mib": max(r["peak_rss"] for r in results) / 2**20,
                      "rss_after_load_mib": max(r["rss_after_load"] for r in results) / 2**20,
                      "load_s_best": min(r["load_s"] for r in results), "files_mib": size / 2**20,
                      "generated": results[0]["generated"]}
    return rows


def markdown(rows: dict[str, Any], info: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"Gemma 3 270M, {len(args.prompt_ids)}-token prompt, {args.new_tokens} new tokens (greedy), "
             f"{args.threads} threads, n_ctx {N_CTX}, best of {args.rounds} interleaved rounds; {info['cpu']} "
             f"({info['cpus']} CPUs, load average {info['load_average'][0]:.1f} at the end); onnxruntime "
             f"{info['onnxruntime']}, onnxruntime-genai {info['onnxruntime_genai']}, llama-cpp-python "
             f"{info['llama_cpp_python']}.", "",
             "| case | decode tok/s (best / median) | prefill tok/s | peak RSS MiB | RSS after load MiB | files MiB | load s |",
             "|---|---|---|---|---|---|---|"]
    for row in rows.values():
        lines.append(f"| {row['label']} | {row['decode_tok_s_best']:.1f} / {row['decode_tok_s_median']:.1f} | "
                     f"{row['prefill_tok_s_best']:.0f} | {row['peak_rss_mib']:.0f} | {row['rss_after_load_mib']:.0f} | "
                     f"{row['files_mib']:.0f} | {row['load_s_best']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="HF checkpoint (default: the rebuilt Gemma 3 270M)")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edgellm" / "bench-onnx")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--prompt", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.work / CASES[args.child][0], json.loads(args.prompt), args.new_tokens, args.threads)
        return 0
    if args.checkpoint is None:
        from edgellm.testing import gemma
        args.checkpoint = gemma.rebuilt_checkpoint()
    build(args.checkpoint, args.work)
    args.prompt_ids = prompt_ids(args.work, args.prompt_tokens)
    cases = [c for c in args.cases.split(",") if c]
    runs: dict[str, list] = {c: [] for c in cases}
    for _ in range(args.rounds):
        for case in cases:
            runs[case].append(measure(case, args.work, args.prompt_ids, args.new_tokens, args.threads))
    rows, info = summarize(runs, args.work), machine()
    print(json.dumps({"machine": info, "results": rows, "runs": runs}, indent=1) if args.json
          else markdown(rows, info, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
