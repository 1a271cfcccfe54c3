"""``edgellm convert``: Hugging Face checkpoint folder -> GGUF file, without torch.

    edgellm convert MODEL_DIR -o OUT.gguf [--type f16] [--quiet] [--json]

TYPE is a llama.cpp file type: f32, f16, bf16 and q8_0 are written directly (the same bytes as llama.cpp's
convert_hf_to_gguf.py); q4_k_m, iq4_xs, ... go through llama.cpp's quantizer. A progress bar goes to stderr
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
    parser.add_argument("-t", "--type", default="f16",
                        help="llama.cpp file type: f32, f16 (default), bf16, q8_0, or a quantized type like q4_k_m")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Convert ``args.model_dir``; library errors propagate to the CLI shell."""
    out = args.output or Path(f"{args.model_dir.resolve().name}-{args.type.lower()}.gguf")
    bar = None if args.quiet else ProgressBar(sys.stderr)
    try:
        result = convert(args.model_dir, out, args.type, quiet=True, progress=bar)
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
