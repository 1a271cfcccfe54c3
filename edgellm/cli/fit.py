"""``edgellm fit``: size a model to a device profile and write a bundle that runs there.

    edgellm fit --device PROFILE MODEL [-o OUT_DIR] [--context N] [--min-tokens-per-s X]
                [--max-quality-loss KLD] [--kv-type f16|q8_0|q4_0] [--format auto|gguf|onnx|both]
                [--allow-prune] [--measure-quality] [--dry-run] [--json]

Candidates: llama.cpp file types, MIXED@<bpw> budgets for the converter's per-tensor allocator (16-bit
sources), and ONNX types (fp32/fp16/int8/int4) when ONNX is planned. With ``--device local`` the speed model
uses the calibration ``edgellm bench MODEL --calibrate`` wrote, and the table says which.

The plan table goes to stderr; ``--json`` prints the plan (or, after a build, the bundle and its plan) on
stdout. Without ``-o`` the bundle goes to ``<model name>-<device>/`` in the current folder; ``--dry-run``
plans only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgellm.cli import output

KV_CHOICES = ("f16", "q8_0", "q4_0")
FORMATS = ("auto", "gguf", "onnx", "both")     # edgellm.fitting.planner.FORMATS (kept import-light here)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fit", help="size a model to a device and write a bundle that runs there",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("model", metavar="MODEL", help="Hugging Face checkpoint folder or .gguf file (a GGUF is only "
                                                  "requantized downward)")
    p.add_argument("--device", required=True, metavar="PROFILE",
                   help="profile id or alias (see `edgellm devices`), `local`, or a profile .toml file")
    p.add_argument("-o", "--out", metavar="OUT_DIR", help="bundle folder to create (must not exist or be empty)")
    p.add_argument("--context", type=int, metavar="N", help="context length in tokens (default: the largest "
                                                            "affordable, at least 2048 when possible)")
    p.add_argument("--min-tokens-per-s", type=float, metavar="X", help="reject candidates predicted slower")
    p.add_argument("--max-quality-loss", type=float, metavar="KLD",
                   help="reject candidates whose expected KL divergence from the 16-bit model is larger")
    p.add_argument("--kv-type", choices=KV_CHOICES, help="KV cache type (default f16; q8_0/q4_0 are tried only "
                                                         "when nothing fits)")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="model format: gguf (llama.cpp), onnx (ONNX Runtime, from a checkpoint) or both; auto "
                        "(default) is onnx when the profile's first backend is an ONNX Runtime provider")
    p.add_argument("--allow-prune", action="store_true",
                   help="also offer models with whole blocks dropped (the cheapest on calibration text); their "
                        "quality loss is measured first (minutes), never assumed")
    p.add_argument("--measure-quality", action="store_true",
                   help="quantize the candidates that fit and measure their KL divergence (slow)")
    p.add_argument("--calibrate-early-exit", action="store_true",
                   help="with --device local: measure early exit here and store heads and the choice in the bundle "
                        "(elsewhere: `edgellm exit calibrate BUNDLE` on the device)")
    p.add_argument("--dry-run", action="store_true", help="plan only: write nothing")
    p.add_argument("--json", action="store_true", help="print the plan (and bundle) as JSON on stdout")
    p.set_defaults(run=run)


def default_out(model: str, device: str) -> Path:
    name = Path(model.rstrip("/")).name.removesuffix(".gguf") or "model"
    return Path(f"{name}-{Path(device).stem}")


def run(args: argparse.Namespace) -> int:
    """Plan, show the table, then build unless --dry-run. Library errors propagate to the CLI shell."""
    from edgellm.fitting import build, fit
    from edgellm.fitting.report import render

    result = fit(args.model, args.device, context=args.context, min_tokens_per_s=args.min_tokens_per_s,
                 max_quality_loss=args.max_quality_loss, kv_type=args.kv_type,
                 measure_quality=args.measure_quality, format=args.format, allow_prune=args.allow_prune)
    if result.device_reason and result.profile.id != args.device:
        output.note(result.device_reason)
    output.note(render(result))
    if args.dry_run:
        if args.json:
            output.print_json(result.to_dict())
        return 0
    out = Path(args.out) if args.out else default_out(args.model, args.device)
    bundle = build(result, out, progress=lambda stage: output.note(f"{stage}..."),
                   early_exit=args.calibrate_early_exit)
    for note in bundle.notes:
        output.note(f"note: {note}")
    if args.json:
        output.print_json({"bundle": str(bundle.path), "model": str(bundle.model_path), "plan": result.to_dict()})
    else:
        print(bundle.path)
    others = ("ONNX Runtime GenAI runs the folder as it is (genai_config.json)" if result.runtime.provider else
              f"see {bundle.path / 'llama.cpp.txt'} and {bundle.path / 'Modelfile'}")
    output.note(f"bundle written to {bundle.path}; run it with `edgellm run {bundle.path}`; {others}")
    return 0
