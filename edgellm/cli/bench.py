"""``edgellm bench BUNDLE``: load time, time to first token, prefill and decode speed, peak memory and
threads, next to the bundle's predictions when its manifest has them."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgellm import bench as benchmark
from edgellm.cli.output import note, print_json, table
from edgellm.cli.run import add_early_exit_flag
from edgellm.units import format_bytes


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="measure load time, TTFT, prefill/decode speed and peak memory",
                              description=__doc__)
    p.add_argument("bundle", metavar="BUNDLE", help="a bundle folder (with edgellm.json) or a .gguf file")
    p.add_argument("-p", "--prompt-tokens", type=int, default=benchmark.DEFAULT_PROMPT_TOKENS, metavar="N",
                   help=f"prompt length in tokens (default {benchmark.DEFAULT_PROMPT_TOKENS})")
    p.add_argument("-n", "--gen-tokens", type=int, default=benchmark.DEFAULT_GEN_TOKENS, metavar="N",
                   help=f"tokens to generate (default {benchmark.DEFAULT_GEN_TOKENS})")
    p.add_argument("--repeat", type=int, default=benchmark.DEFAULT_REPEAT, metavar="R",
                   help=f"timed runs; medians are reported (default {benchmark.DEFAULT_REPEAT})")
    p.add_argument("--ctx", type=int, metavar="N", help="context length in tokens (default: the bundle's)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="threads for decode and prompt (default: the bundle's, else measured once and cached)")
    p.add_argument("--provider", metavar="NAME",
                   help="ONNX models: ONNX Runtime execution provider (cpu, cuda, qnn, ..., auto; see `edgellm run`)")
    add_early_exit_flag(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--calibrate", action="store_true",
                   help="measure decode speed at 1 and the planned thread count (or --threads) and write the speed "
                        "calibration `edgellm fit --device local` uses (GGUF models; adds to earlier calibrations)")
    p.set_defaults(run=run)


def result_rows(result: benchmark.BenchResult) -> list[tuple[str, str]]:
    """(measure, value) rows of the human-readable report."""
    return [
        ("model", f"{Path(result.model_path).name} ({result.backend}, n_ctx {result.n_ctx})"),
        ("threads", f"{result.n_threads} decode / {result.n_threads_batch} prompt ({result.threads_source})"),
        ("load", f"{result.load_seconds:.2f} s"),
        ("time to first token", f"{result.ttft_seconds * 1000:.0f} ms ({result.prompt_tokens}-token prompt)"),
        ("prefill", f"{result.prefill_tokens_per_s:.1f} tok/s"),
        ("decode", f"{result.decode_tokens_per_s:.1f} tok/s ({result.gen_tokens} tokens)"),
        ("early exit", result.early_exit + ("" if result.acceptance_rate is None
                                            else f" (acceptance {result.acceptance_rate:.2f})")),
        ("RSS after load", format_bytes(result.rss_after_load_bytes)),
        ("peak RSS", f"{format_bytes(result.peak_rss_bytes)} ({result.peak_rss_scope})"),
    ]


def prediction_rows(result: benchmark.BenchResult) -> list[tuple[str, str, str, str]]:
    fmt = {"memory_total_bytes": format_bytes}
    return [(p.name, fmt.get(p.name, "{:.1f}".format)(p.predicted), fmt.get(p.name, "{:.1f}".format)(p.measured),
             f"{p.ratio:.2f}") for p in result.predictions]


def calibration_rows(result: benchmark.CalibrationResult) -> list[tuple[str, str, str, str]]:
    """(threads, measured, predicted, error) rows: the calibrated model against its own measurements."""
    return [(str(p.threads), f"{p.measured_tokens_per_s:.1f}", f"{p.predicted_tokens_per_s:.1f}",
             f"{100 * (p.predicted_tokens_per_s / p.measured_tokens_per_s - 1):+.1f}%") for p in result.points]


def run_calibration(args: argparse.Namespace) -> int:
    threads = benchmark.calibration_threads(args.threads) if args.threads else None
    result = benchmark.calibrate(args.bundle, threads=threads, prompt_tokens=args.prompt_tokens,
                                 gen_tokens=args.gen_tokens, repeat=args.repeat)
    if args.json:
        print_json(result.to_dict())
        return 0
    print(table(("threads", "decode tok/s measured", "calibrated prediction", "error"), calibration_rows(result)))
    note(f"speed calibration for `edgellm fit --device {result.device}` written to {result.path} "
         f"({result.n_samples} sample(s) in all)")
    return 0


def run(args: argparse.Namespace) -> int:
    if getattr(args, "calibrate", False):
        return run_calibration(args)
    result = benchmark.bench(args.bundle, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                             n_ctx=args.ctx, n_threads=args.threads, repeat=args.repeat, provider=args.provider,
                             early_exit=args.early_exit)
    if args.json:
        print_json(result.to_dict())
        return 0
    print(table(("measure", f"median of {result.repeat} run(s)"), result_rows(result)))
    if result.predictions:
        print()
        print(table(("predicted by the plan", "predicted", "measured", "measured/predicted"),
                    prediction_rows(result)))
    if result.predictions_note:
        note(result.predictions_note)
    return 0
