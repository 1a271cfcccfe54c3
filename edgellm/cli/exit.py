"""``edgellm exit calibrate BUNDLE``: measure early exit on this machine and store heads and settings."""

from __future__ import annotations

import argparse

from edgellm.cli.output import note, print_json, table


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("exit", help="early exit: fit exit heads and choose settings for a bundle",
                              description="Early exit (draft and verify, confidence exit) for a GGUF bundle.")
    sub = p.add_subparsers(dest="exit_command", metavar="SUBCOMMAND", required=True)
    c = sub.add_parser("calibrate", help="fit exit heads, measure acceptance and speed, store the choice",
                       description="Fit exit heads on calibration text, measure draft acceptance and decode speed "
                                   "here, and enable lossless early exit in the bundle only if it is at least "
                                   "1.1x faster (otherwise record why it stayed off).")
    c.add_argument("bundle", metavar="BUNDLE", help="a bundle folder (with edgellm.json) holding a GGUF model")
    c.add_argument("--text", metavar="FILE", help="calibration text (default: the bundled calibration text)")
    c.add_argument("--exit-layers", type=int, nargs="+", metavar="E",
                   help="blocks to run before exiting (default: all of them, i.e. a reduced head only)")
    c.add_argument("--vocab-sizes", type=int, nargs="+", default=[4096, 16384], metavar="V",
                   help="reduced-head sizes to try (default 4096 16384)")
    c.add_argument("-k", "--draft-tokens", type=int, nargs="+", default=[2, 4, 8], metavar="K",
                   help="draft lengths to try (default 2 4 8)")
    c.add_argument("-n", "--gen-tokens", type=int, default=48, metavar="N", help="tokens per timed generation")
    c.add_argument("--threads", type=int, metavar="N", help="threads (default: the bundle's)")
    c.add_argument("--dry-run", action="store_true", help="measure only; leave the bundle unchanged")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)


def _rows(result) -> list[tuple[str, ...]]:
    rows = []
    for m in result.measurements:
        setting = (f"E={m['exit_layer']} V={m['vocab_size']}" if m.get("exit_layer") else m.get("draft", ""))
        if m["mode"] == "acceptance":
            rows.append(("greedy agreement", setting, f"{m['acceptance']:.3f}", ""))
        else:
            what = f"{m['draft']} E={m.get('exit_layer', '-')} V={m.get('vocab_size', '-')} k={m['k']}"
            rows.append(("lossless decode", what, f"{m['acceptance']:.3f}", f"{m['tok_s']:.1f} tok/s"))
    return rows


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edgellm.early_exit.calibrate import calibrate

    text = Path(args.text).read_text(encoding="utf-8") if args.text else None
    result = calibrate(args.bundle, text=text, exit_layers=args.exit_layers, vocab_sizes=args.vocab_sizes,
                       ks=args.draft_tokens, max_tokens=args.gen_tokens, n_threads=args.threads,
                       write=not args.dry_run)
    if args.json:
        from dataclasses import asdict
        print_json(asdict(result))
        return 0
    print(table(("measure", "setting", "acceptance", "speed"), _rows(result)))
    print(f"plain decode: {result.plain_tok_s:.1f} tok/s; chosen: {result.mode}")
    note(result.reason)
    return 0
