"""``edgellm convert``: Hugging Face checkpoint folder -> GGUF file or ONNX folder, without torch.

    edgellm convert MODEL_DIR [--format gguf] -o OUT.gguf [--type f16] [--imatrix auto|FILE]
        [--calibration FILE] [--target-size SIZE | --target-bpw BPW] [--tensor-type PATTERN=TYPE ...]
        [--output-tensor-type T] [--token-embedding-type T] [--quiet] [--json]
    edgellm convert MODEL_DIR --format onnx -o OUT_DIR [--type fp32|fp16|int8|int4] [--block-size N]
        [--provider NAME] [--asymmetric] [--accuracy-level N] [--lm-head int8|int4|float] [--quiet] [--json]

GGUF: TYPE is a llama.cpp file type: f32, f16, bf16 and q8_0 are written directly (the same bytes as llama.cpp's
convert_hf_to_gguf.py); q4_k_m, iq4_xs, ... go through llama.cpp's quantizer. --target-size/--target-bpw
choose each tensor's type from its measured sensitivity instead, to land at most 1% under the budget.
ONNX: a folder with model.onnx, its external weights, genai_config.json and the tokenizer, built for one
ONNX Runtime execution provider's op set (edgellm.converters.onnx). Options of one format are refused with
the other. A progress bar goes to stderr unless --quiet; the summary goes to stdout (--json for machines).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

from edgellm.cli import output
from edgellm.converters import ConvertResult, convert
from edgellm.errors import UsageError
from edgellm.units import format_bytes

BAR_WIDTH = 30
REDRAW_SECONDS = 0.1     # at most ten redraws a second
FORMATS = ("gguf", "onnx")
DEFAULT_TYPES = {"gguf": "f16", "onnx": "fp32"}
# argparse dest -> (the one format it applies to, its flag); the other format refuses it with a message
FORMAT_OPTIONS: dict[str, tuple[str, str]] = {
    "target_size": ("gguf", "--target-size"), "target_bpw": ("gguf", "--target-bpw"),
    "imatrix": ("gguf", "--imatrix"), "calibration": ("gguf", "--calibration"),
    "tensor_type": ("gguf", "--tensor-type"), "output_tensor_type": ("gguf", "--output-tensor-type"),
    "token_embedding_type": ("gguf", "--token-embedding-type"),
    "block_size": ("onnx", "--block-size"), "provider": ("onnx", "--provider"),
    "asymmetric": ("onnx", "--asymmetric"), "accuracy_level": ("onnx", "--accuracy-level"),
    "lm_head": ("onnx", "--lm-head"),
}
ONNX_DEFAULT_BLOCK_SIZE = 32


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``convert`` to the top-level parser."""
    parser = subparsers.add_parser("convert", help="convert a Hugging Face checkpoint to GGUF or ONNX",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", metavar="MODEL_DIR", type=Path,
                        help="folder with config.json, *.safetensors and the tokenizer files")
    parser.add_argument("--format", choices=FORMATS, default="gguf",
                        help="gguf (default): one file for llama.cpp; onnx: a folder for ONNX Runtime (GenAI)")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="GGUF file or ONNX folder to write (default: MODEL_DIR's name + type, in the current "
                             "folder)")
    parser.add_argument("-t", "--type", default=None,
                        help="gguf: llama.cpp file type: f32, f16 (default), bf16, q8_0, or a quantized type like "
                             "q4_k_m; onnx: fp32 (default), fp16, int8 or int4")
    _add_gguf_flags(parser)
    _add_onnx_flags(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def _add_gguf_flags(parser: argparse.ArgumentParser) -> None:
    gguf = parser.add_argument_group("GGUF only")
    budget = gguf.add_mutually_exclusive_group()
    budget.add_argument("--target-size", metavar="SIZE", default=None,
                        help="file size to fill, e.g. '180MB': per-tensor types chosen from measured sensitivity")
    budget.add_argument("--target-bpw", metavar="BPW", type=float, default=None,
                        help="bits per weight to fill, e.g. 4.5: per-tensor types chosen from measured sensitivity")
    gguf.add_argument("--imatrix", metavar="auto|FILE", default=None,
                      help="importance matrix for quantized types: 'auto' computes one on calibration text, or "
                           "an imatrix file (llama.cpp's GGUF or .dat format)")
    gguf.add_argument("--calibration", metavar="FILE", type=Path, default=None,
                      help="text for --imatrix auto (default: the calibration text bundled with edgellm)")
    gguf.add_argument("--tensor-type", metavar="PATTERN=TYPE", action="append", type=_override, default=None,
                      help="store tensors whose name matches the regular expression PATTERN as ggml TYPE "
                           "(e.g. 'ffn_down=q6_k'); repeatable, first match wins")
    gguf.add_argument("--output-tensor-type", metavar="TYPE", default=None, help="ggml type of output.weight")
    gguf.add_argument("--token-embedding-type", metavar="TYPE", default=None, help="ggml type of token_embd.weight")


def _add_onnx_flags(parser: argparse.ArgumentParser) -> None:
    onnx = parser.add_argument_group("ONNX only")
    onnx.add_argument("--block-size", type=int, metavar="N", default=None,
                      help=f"int8/int4: weights per quantization block, 16-256 (default {ONNX_DEFAULT_BLOCK_SIZE})")
    onnx.add_argument("--provider", metavar="NAME", default=None,
                      help="execution provider whose op set the graph uses: cpu (default), cuda, tensorrt, dml, "
                           "openvino, qnn, coreml")
    onnx.add_argument("--asymmetric", action="store_true", default=None,
                      help="int8/int4: blocks with zero points instead of symmetric ones")
    onnx.add_argument("--accuracy-level", type=int, metavar="N", default=None,
                      help="MatMulNBits accuracy_level 0-4 (default: 4 on the CPU, int8 activations; else 0)")
    onnx.add_argument("--lm-head", choices=("int8", "int4", "float"), default=None,
                      help="storage of the output projection (default: int8 under int4, else the model's type)")


def run(args: argparse.Namespace) -> int:
    """Convert ``args.model_dir``; library errors propagate to the CLI shell."""
    check_format_options(args)
    bar = None if args.quiet else ProgressBar(sys.stderr)
    try:
        result = _convert(args, bar)
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


def check_format_options(args: argparse.Namespace) -> None:
    """Raise UsageError naming every flag given that belongs to the other format."""
    wrong = [flag for dest, (fmt, flag) in FORMAT_OPTIONS.items()
             if fmt != args.format and getattr(args, dest, None) not in (None, [], False)]
    if wrong:
        other = next(f for f in FORMATS if f != args.format)
        raise UsageError(problem=f"{', '.join(wrong)} only appl{'ies' if len(wrong) == 1 else 'y'} to "
                                 f"--format {other}, not --format {args.format}",
                         hint_text=f"drop {' and '.join(wrong)}, or add --format {other}")


def _default_output(args: argparse.Namespace, label: str) -> Path:
    name = f"{args.model_dir.resolve().name}-{label.lower()}"
    return Path(f"{name}.gguf" if args.format == "gguf" else f"{name}-onnx")


def _gguf_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(imatrix=args.imatrix, calibration=args.calibration, output_type=args.output_tensor_type,
                embedding_type=args.token_embedding_type, overrides=args.tensor_type or None,
                target_size=args.target_size, target_bpw=args.target_bpw)


def _onnx_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(provider=args.provider or "cpu", block_size=args.block_size or ONNX_DEFAULT_BLOCK_SIZE,
                symmetric=not args.asymmetric, accuracy_level=args.accuracy_level, lm_head=args.lm_head)


# --format -> keyword arguments of edgellm.converters.convert for that format
FORMAT_ARGUMENTS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "gguf": _gguf_options, "onnx": _onnx_options,
}


def _convert(args: argparse.Namespace, bar: Callable | None) -> Any:
    """``convert()`` with the flags of ``args.format``; the default output is named after the type."""
    label = args.type or ("mixed" if args.target_size or args.target_bpw else DEFAULT_TYPES[args.format])
    return convert(args.model_dir, args.output or _default_output(args, label), args.type, format=args.format,
                   quiet=True, progress=bar, **FORMAT_ARGUMENTS[args.format](args))


def _override(text: str) -> tuple[str, str]:
    """``PATTERN=TYPE`` -> (pattern, type); the type is checked by the library, which names it on error."""
    pattern, sep, type_name = text.rpartition("=")
    if not sep or not pattern or not type_name:
        raise argparse.ArgumentTypeError(f"{text!r} is not PATTERN=TYPE (for example 'attn_v=q8_0')")
    return pattern, type_name


def summary(result: Any) -> str:
    """One line: where, how big, which type (and provider for ONNX), bits per weight, time."""
    kind = f"{result.type} for {result.provider}" if hasattr(result, "provider") else result.type
    return (f"wrote {result.path} ({format_bytes(result.size_bytes)}, {kind}, "
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
