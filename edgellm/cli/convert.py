"""``edgellm convert``: Hugging Face checkpoint folder -> GGUF file, without torch.

    edgellm convert MODEL_DIR -o OUT.gguf [--type f16] [--imatrix auto|FILE] [--calibration FILE]
        [--target-size SIZE | --target-bpw BPW] [--tensor-type PATTERN=TYPE ...] [--output-tensor-type T]
        [--token-embedding-type T] [--quiet] [--json]

TYPE is a llama.cpp file type: f32, f16, bf16 and q8_0 are written directly (the same bytes as llama.cpp's
convert_hf_to_gguf.py); q4_k_m, iq4_xs, ... go through llama.cpp's quantizer. --target-size/--target-bpw
choose each tensor's type from its measured sensitivity instead, to land at most 1% under the budget. A progress bar goes to stderr
unless --quiet; the summary goes to stdout (--json for machines).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from edgellm.cli import output
from edgellm.converters import ConvertResult, convert
from edgellm.units import format_bytes

BAR_WIDTH = 30
REDRAW_SECONDS = 0.1     # at most ten redraws a second


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``convert`` to the top-level parser."""
    parser = subparsers.add_parser("convert", help="convert a Hugging Face checkpoint to GGUF",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", metavar="MODEL_DIR", type=Path,
                        help="folder with config.json, *.safetensors and the tokenizer files")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="GGUF file to write (default: MODEL_DIR's name + type, in the current folder)")
    parser.add_argument("-t", "--type", default=None,
                        help="llama.cpp file type: f32, f16 (default), bf16, q8_0, or a quantized type like q4_k_m")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--target-size", metavar="SIZE", default=None,
                        help="file size to fill, e.g. '180MB': per-tensor types chosen from measured sensitivity")
    budget.add_argument("--target-bpw", metavar="BPW", type=float, default=None,
                        help="bits per weight to fill, e.g. 4.5: per-tensor types chosen from measured sensitivity")
    parser.add_argument("--imatrix", metavar="auto|FILE", default=None,
                        help="importance matrix for quantized types: 'auto' computes one on calibration text, or "
                             "an imatrix file (llama.cpp's GGUF or .dat format)")
    parser.add_argument("--calibration", metavar="FILE", type=Path, default=None,
                        help="text for --imatrix auto (default: the calibration text bundled with edgellm)")
    parser.add_argument("--tensor-type", metavar="PATTERN=TYPE", action="append", type=_override, default=[],
                        help="store tensors whose name matches the regular expression PATTERN as ggml TYPE "
                             "(e.g. 'ffn_down=q6_k'); repeatable, first match wins")
    parser.add_argument("--output-tensor-type", metavar="TYPE", default=None, help="ggml type of output.weight")
    parser.add_argument("--token-embedding-type", metavar="TYPE", default=None,
                        help="ggml type of token_embd.weight")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Convert ``args.model_dir``; library errors propagate to the CLI shell."""
    label = args.type or ("mixed" if args.target_size or args.target_bpw else "f16")
    out = args.output or Path(f"{args.model_dir.resolve().name}-{label.lower()}.gguf")
    bar = None if args.quiet else ProgressBar(sys.stderr)
    try:
        result = convert(args.model_dir, out, args.type, quiet=True, progress=bar, imatrix=args.imatrix,
                         calibration=args.calibration, output_type=args.output_tensor_type,
                         embedding_type=args.token_embedding_type, overrides=args.tensor_type or None,
                         target_size=args.target_size, target_bpw=args.target_bpw)
    finally:
        if bar is not None:
            bar.close()
    for note in result.notes:
        output.note(f"note: {note}")
    if args.json:
        output.print_json(result.to_dict())
    else:
        print(summary(result))
    return 0


def _override(text: str) -> tuple[str, str]:
    """``PATTERN=TYPE`` -> (pattern, type); the type is checked by the library, which names it on error."""
    pattern, sep, type_name = text.rpartition("=")
    if not sep or not pattern or not type_name:
        raise argparse.ArgumentTypeError(f"{text!r} is not PATTERN=TYPE (for example 'attn_v=q8_0')")
    return pattern, type_name


def summary(result: ConvertResult) -> str:
    """One line: where, how big, which type, bits per weight, time."""
    return (f"wrote {result.path} ({format_bytes(result.size_bytes)}, {result.type}, "
            f"{result.bits_per_weight:.2f} bits/weight, {result.n_params:,} parameters) in {result.seconds:.1f} s")


class ProgressBar:
    """A one-line text bar on ``stream``, redrawn in place; callable as convert's ``progress``."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.live = stream.isatty()      # into a log file: only the final state, not every redraw
        self.last = 0.0
        self.drawn = False

    def __call__(self, done: int, total: int, name: str) -> None:
        now = time.monotonic()
        if done < total and (not self.live or now - self.last < REDRAW_SECONDS):
            return
        self.last = now
        filled = BAR_WIDTH * done // max(total, 1)
        line = f"\r[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {100 * done // max(total, 1):3d}% {name}"
        self.stream.write(line[:120].ljust(80))
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
