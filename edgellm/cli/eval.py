"""``edgellm eval BUNDLE``: perplexity on a text, and against ``--reference`` KL divergence and top-1
agreement (windows of ``--ctx`` tokens, the second half of each scored, as llama-perplexity does)."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgellm import evaluate as evaluation
from edgellm.cli.output import print_json, table
from edgellm.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="perplexity, and KL divergence against a reference model",
                              description=__doc__)
    p.add_argument("bundle", metavar="BUNDLE", help="a bundle folder (with edgellm.json) or a .gguf file")
    p.add_argument("--reference", metavar="OTHER",
                   help="reference model with the same tokenizer (for example the f16 original)")
    p.add_argument("--text", metavar="FILE", help="UTF-8 text to score (default: the shipped evaluation text)")
    p.add_argument("--ctx", type=int, default=evaluation.DEFAULT_N_CTX, metavar="N",
                   help=f"window length in tokens (default {evaluation.DEFAULT_N_CTX})")
    p.add_argument("--tokens", type=int, metavar="N", help="score only the first N tokens of the text")
    p.add_argument("--threads", type=int, metavar="N", help="threads (default: measured once and cached)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)


def result_rows(result: evaluation.EvalResult) -> list[tuple[str, str]]:
    rows = [("text", f"{result.text_source}: {result.text_tokens} tokens, {result.windows} window(s) of "
                     f"{result.n_ctx}, {result.scored_tokens} scored"),
            ("perplexity", f"{result.perplexity:.4f} ± {result.perplexity_stderr:.4f}")]
    c = result.comparison
    if c is not None:
        rows += [("reference perplexity", f"{c.reference_perplexity:.4f} ({Path(c.reference_path).name})"),
                 ("KLD mean", f"{c.kld_mean:.6f}"),
                 ("KLD median / p90 / p99 / max", f"{c.kld_median:.6f} / {c.kld_p90:.6f} / {c.kld_p99:.6f} / "
                                                  f"{c.kld_max:.6f}"),
                 ("top-1 agreement", f"{c.top1_agreement:.4f}")]
    rows.append(("time", f"{result.seconds:.1f} s"))
    return rows


def _read_text(path: str) -> Path:
    text = Path(path)
    if not text.is_file():
        raise UsageError(f"--text {path}: no such file", "pass a UTF-8 text file")
    return text


def run(args: argparse.Namespace) -> int:
    if args.ctx < 8:
        raise UsageError(f"--ctx must be at least 8 tokens, got {args.ctx}")
    if args.tokens is not None and args.tokens < 2:
        raise UsageError(f"--tokens must be at least 2, got {args.tokens}")
    result = evaluation.evaluate(args.bundle, reference=args.reference,
                                 text=_read_text(args.text) if args.text else None, n_ctx=args.ctx,
                                 n_threads=args.threads, max_tokens=args.tokens)
    if args.json:
        print_json(result.to_dict())
    else:
        print(table(("measure", "value"), result_rows(result)))
    return 0
