"""GGUF conversion benchmark, run by hand: speed beside a plain file copy, and quantization quality.

    .venv/bin/python benchmarks/convert.py [--speed] [--quality] [--quick] [--work DIR] [--json FILE]

1. Speed (``--speed``): wall time, input MB/s and peak RSS of ``edgellm.converters.convert`` to f16 and to
   Q4_K_M, each in a fresh process, for the Gemma 3 270M checkpoint rebuilt from the [demo] GGUF and for a
   generated ~1B-parameter llama checkpoint (bf16, random weights), beside a plain copy of the same
   safetensors bytes (the yardstick; the copy runs first, so all runs read from a warm page cache).
2. Quality (``--quality``): size / bpw / PPL / KLD / top-1 agreement on the channel-permuted Gemma checkpoint
   (held-out text: edgellm/data/eval.txt, n_ctx 512, as ``edgellm eval``), against its own f16 conversion:
   llama.cpp's stock types (llama_model_quantize on the f16 file, no importance matrix, what llama-quantize
   does), the same types with ``--imatrix auto`` (the importance matrix computed once on the bundled
   calibration text, exactly what ``convert(..., imatrix="auto")`` computes), and ``--target-size`` /
   ``--target-bpw`` points (one sensitivity measurement shared by all points). KLD ratios are taken against
   stock Q4_K_M measured in the same run.
Both print markdown tables (ratios measured side by side in one run) and ``--json`` keeps every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MB = 1e6
EVAL_N_CTX = 512            # as `edgellm eval` (edgellm.evaluate.DEFAULT_N_CTX)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64)   # 16 x 60.8M layer weights: ~0.97B parameters
STOCK_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "IQ4_NL", "Q4_0", "Q3_K_M")
IMATRIX_TYPES = ("Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "IQ4_NL", "Q4_0", "Q3_K_M")
TARGET_BPW = (4.5, 5.0, 5.5, 6.5, 8.0)
QUICK_STOCK, QUICK_IMATRIX, QUICK_BPW = ("Q4_K_M",), ("Q4_K_M",), (5.0,)

# Runs in a fresh interpreter: converts, then reports its own wall time and peak RSS. Peak RSS is VmHWM, which
# exec resets (ru_maxrss is not reset by exec: it would count the forking parent's memory).
_CHILD = """
import json, sys, time
from edgellm.bench import peak_rss_bytes
from edgellm.converters import convert
start = time.perf_counter()
result = convert(sys.argv[1], sys.argv[2], sys.argv[3])
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "size": result.size_bytes, "peak_rss": peak_rss_bytes()}))
"""


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


# ----------------------------------------------------------------------------------------------------------------
# Speed
# ----------------------------------------------------------------------------------------------------------------

def input_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def copy_run(model_dir: Path, work: Path) -> dict[str, float]:
    """Plain copy of the checkpoint's safetensors bytes (what any converter must at least read and write).

    Neither the copy nor the converter calls fsync: both are timed to the page cache."""
    target = work / "copy"
    target.mkdir(exist_ok=True)
    files = input_files(model_dir)
    start = time.perf_counter()
    for f in files:
        shutil.copyfile(f, target / f.name)
    seconds = time.perf_counter() - start
    shutil.rmtree(target)
    return {"seconds": seconds, "bytes": sum(f.stat().st_size for f in files)}


def convert_run(model_dir: Path, out: Path, type_name: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(model_dir), str(out), type_name],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"convert {model_dir} -> {type_name} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    out.unlink(missing_ok=True)
    return result


def llama_1b(work: Path) -> Path:
    """The generated ~1B llama checkpoint (bf16), built once into ``work``."""
    from edgellm.testing.tiny import make_checkpoint

    target = work / "llama-1b"
    if not (target / "config.json").exists():
        print("generating the ~1B-parameter llama checkpoint (bf16) ...", file=sys.stderr)
        make_checkpoint("llama", target, dtype="bf16", shards=2, **LLAMA_1B)
    return target


def speed(work: Path, quick: bool) -> list[dict[str, Any]]:
    from edgellm.testing import gemma

    sources = [("Gemma 3 270M (rebuilt, bf16)", gemma.rebuilt_checkpoint())]
    if not quick:
        sources.append(("llama ~1B (generated, bf16)", llama_1b(work)))
    rows = []
    for label, model_dir in sources:
        copy = copy_run(model_dir, work)
        size = copy["bytes"]
        row = {"model": label, "input_bytes": size, "copy_s": copy["seconds"], "copy_mb_s": size / MB / copy["seconds"]}
        for type_name in ("f16", "q4_k_m"):
            run = convert_run(model_dir, work / f"speed-{type_name}.gguf", type_name)
            row[type_name] = {**run, "mb_s": size / MB / run["seconds"],
                              "vs_copy": (size / run["seconds"]) / (size / copy["seconds"])}
        rows.append(row)
        print_speed([row])
    return rows


def print_speed(rows: list[dict[str, Any]]) -> None:
    print("| model | input | copy | f16: wall, MB/s, x copy speed, peak RSS | Q4_K_M: wall, MB/s, peak RSS |")
    print("|---|---|---|---|---|")
    for r in rows:
        f16, q4 = r["f16"], r["q4_k_m"]
        print(f"| {r['model']} | {r['input_bytes'] / MB:.0f} MB | {r['copy_s']:.2f} s ({r['copy_mb_s']:.0f} MB/s) | "
              f"{f16['seconds']:.2f} s, {f16['mb_s']:.0f} MB/s, {f16['vs_copy']:.2f}x, {f16['peak_rss'] / MB:.0f} MB | "
              f"{q4['seconds']:.2f} s, {q4['mb_s']:.0f} MB/s, {q4['peak_rss'] / MB:.0f} MB |")


# ----------------------------------------------------------------------------------------------------------------
# Quality
# ----------------------------------------------------------------------------------------------------------------

class CachedReference:
    """The f16 reference runtime, its logits kept after the first pass so each row scores only its own model.

    Holds (scored positions x n_vocab) float32: about 2.5 GB for Gemma on eval.txt.
    """

    def __init__(self, runtime: Any):
        self.runtime = runtime
        self.info = runtime.info
        self.cache: dict[tuple, np.ndarray] = {}

    def tokenize(self, text: str, **kw: Any) -> list[int]:
        return self.runtime.tokenize(text, **kw)

    def logits(self, tokens, *, start: int = 0, positions=None) -> np.ndarray:
        key = (len(tokens), hash(tuple(tokens)), tuple(positions or ()))
        if key not in self.cache:
            self.cache[key] = self.runtime.logits(tokens, start=start, positions=positions)
        return self.cache[key].copy()   # the scorer normalises its argument in place


@dataclass
class Scorer:
    """Scores models on the held-out text against the cached f16 reference, as ``edgellm eval`` does."""

    reference: CachedReference
    ids: list[int]

    @classmethod
    def open(cls, f16: Path) -> "Scorer":
        from edgellm.evaluate import default_text
        from edgellm.runtime import Runtime

        runtime = Runtime.load(f16, n_ctx=EVAL_N_CTX)
        return cls(CachedReference(runtime), runtime.tokenize(default_text(), add_special=False))

    def score(self, path: Path) -> dict[str, float]:
        from edgellm.evaluate import check_same_tokenizer, default_text, perplexity_stats, score
        from edgellm.runtime import Runtime

        start = time.perf_counter()
        model = Runtime.load(path, n_ctx=EVAL_N_CTX)
        try:
            check_same_tokenizer(model, self.reference, default_text())
            totals = score(model, self.ids, n_ctx=EVAL_N_CTX, reference=self.reference)
        finally:
            model.close()
        kld = np.concatenate(totals.kld)
        return {"ppl": perplexity_stats(np.concatenate(totals.nll))[1],
                "ref_ppl": perplexity_stats(np.concatenate(totals.ref_nll))[1],
                "kld": float(kld.mean()), "kld_p99": float(np.percentile(kld, 99)),
                "top1": float(np.concatenate(totals.agree).mean()), "scored": int(kld.size),
                "eval_s": time.perf_counter() - start}


def quality(work: Path, quick: bool) -> dict[str, Any]:
    from edgellm.converters import convert
    from edgellm.converters import sensitivity as sens
    from edgellm.converters.imatrix import compute_imatrix
    from edgellm.converters.quantize import quantize_gguf
    from edgellm.testing import gemma

    f16 = work / "permuted-f16.gguf"
    convert(gemma.permuted_checkpoint(), f16, "f16")
    scorer = Scorer.open(f16)
    rows: list[dict[str, Any]] = []

    def add(label: str, kind: str, path: Path, result: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        row = {"label": label, "kind": kind, "size": path.stat().st_size, "bpw": result.bits_per_weight,
               **scorer.score(path), **(extra or {})}
        path.unlink()
        rows.append(row)
        print(f"{label:34s} {row['size'] / MB:7.1f} MB  bpw {row['bpw']:.2f}  PPL {row['ppl']:.3f}  "
              f"KLD {row['kld']:.5f}  top-1 {row['top1']:.3f}", file=sys.stderr, flush=True)
        return row

    for t in QUICK_STOCK if quick else STOCK_TYPES:
        out = work / f"stock-{t}.gguf"
        add(f"llama.cpp {t}", "stock", out, quantize_gguf(f16, out, t))
    started = time.perf_counter()
    matrix = compute_imatrix(f16)
    imatrix_s = time.perf_counter() - started
    for t in QUICK_IMATRIX if quick else IMATRIX_TYPES:
        out = work / f"imatrix-{t}.gguf"
        add(f"edgellm {t} --imatrix auto", "imatrix", out, quantize_gguf(f16, out, t, imatrix=matrix))
    started = time.perf_counter()
    sensitivity = sens.measure_sensitivity(f16, work_dir=work)
    sensitivity_s = time.perf_counter() - started
    stock_q4km = next(r for r in rows if r["label"] == "llama.cpp Q4_K_M")
    targets = [("--target-size = stock Q4_K_M", stock_q4km["size"])]
    targets += [(f"--target-bpw {b}", sens.budget_for_bpw(f16, b)) for b in (QUICK_BPW if quick else TARGET_BPW)]
    for label, budget in targets:
        out = work / "target.gguf"
        result, allocation = sens.quantize_to_budget(f16, out, budget, sensitivity=sensitivity)
        add(f"edgellm {label}", "target", out, result,
            {"budget": budget, "expected_kld": allocation.expected_loss, "types": allocation.type_counts()})
    for r in rows:
        r["kld_vs_stock_q4km"] = r["kld"] / stock_q4km["kld"]
    return {"rows": rows, "imatrix_seconds": imatrix_s, "imatrix_tokens": matrix.n_tokens,
            "sensitivity_seconds": sensitivity_s, "sensitivity": sensitivity.measurements,
            "f16_ppl": stock_q4km["ref_ppl"], "scored_tokens": stock_q4km["scored"]}


def print_quality(q: dict[str, Any]) -> None:
    print(f"f16 reference PPL {q['f16_ppl']:.3f} on {q['scored_tokens']} scored tokens of eval.txt (n_ctx 512)")
    print("| model | size | bpw | PPL | KLD vs f16 | KLD / stock Q4_K_M | top-1 | expected KLD | types |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in q["rows"]:
        expected = f"{r['expected_kld']:.4f}" if "expected_kld" in r else ""
        types = ", ".join(f"{k} {v}" for k, v in r.get("types", {}).items())
        print(f"| {r['label']} | {r['size'] / MB:.1f} MB | {r['bpw']:.2f} | {r['ppl']:.3f} | {r['kld']:.4f} | "
              f"{r['kld_vs_stock_q4km']:.2f}x | {r['top1']:.3f} | {expected} | {types} |")
    m = q["sensitivity"]
    print(f"importance matrix: {q['imatrix_tokens']} tokens, {q['imatrix_seconds']:.0f} s; sensitivity "
          f"measurement: {q['sensitivity_seconds']:.0f} s ({m['probe_runs']} scoring runs of {m['probe_tokens']} "
          f"tokens; seconds {m['seconds']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--speed", action="store_true", help="conversion speed and memory only")
    parser.add_argument("--quality", action="store_true", help="quantization quality table only")
    parser.add_argument("--quick", action="store_true", help="Gemma only, one type per kind, one bpw point")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edgellm" / "bench-convert")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args(argv)
    both = not (args.speed or args.quality)
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine()}
    print(f"{report['date']}, {report['machine']}")
    if args.speed or both:
        report["speed"] = speed(args.work, args.quick)
    if args.quality or both:
        report["quality"] = quality(args.work, args.quick)
        print_quality(report["quality"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
