"""Early-exit benchmark on the ONNX backend (Gemma 3 270M, int4 export of the rebuilt checkpoint), run by hand:

    .venv/bin/python benchmarks/early_exit_onnx.py [--folder DIR] [--threads N] [--gen-tokens N] [--json FILE]

Side by side in one run, on this machine, through the decoder graph cut at the exit layer:
1. greedy agreement of exit heads with the full model on held-out text, per exit layer E and head size V;
2. decode tok/s of plain decoding (whole graph, and through the graph cut at the final norm), of lossless
   self-drafting on the split graph per (E, V, k) and of prompt lookup (free and grounded prompts), with
   acceptance and whether the tokens equal plain greedy (verification runs the blocks one token at a time and
   the output head once over all guesses, so they should, every time);
3. the confidence exit (CALM: exit at E, the upper layers' KV filled from the exit state) per E and threshold:
   decode tok/s, share of steps that exited, and its quality on held-out text fed one token at a time through
   the exiting backend (so the filled cache entries affect later positions as in generation): top-1
   agreement with the full model and mean KL(exit || full).
Ratios are against plain decoding measured in the same run with the same prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edgellm.converters.imatrix import default_calibration_text
from edgellm.early_exit import onnx_exit
from edgellm.early_exit.calibrate import FIT_TOKENS, HELD_OUT_TOKENS, RIDGE, decode_speed, windows_of
from edgellm.early_exit.heads import rank_vocab
from edgellm.runtime.onnx import OnnxBackend

sys.path.insert(0, str(Path(__file__).parent))
from early_exit import GROUNDED  # noqa: E402 - the llama.cpp benchmark's grounded prompts, shared

PROMPTS = ("The history of the printing press begins", "def parse_config(path):\n    \"\"\"Read a config file",
           "Write a short story about a lighthouse keeper.")
EXIT_LAYERS = (12, 15, 18)
VOCAB_SIZES = (4096, 16384)
KS = (2, 4)
CONFIDENCE_LAYERS = (15, 18)
THRESHOLDS = (0.9, 0.7, 0.5, 0.3)
QUALITY_TOKENS = 128
DEFAULT_FOLDER = Path.home() / ".cache" / "edgellm" / "bench-onnx" / "onnx-int4"   # benchmarks/onnx_decode.py builds it


def confidence_quality(backend, head, threshold: float, tokens) -> tuple[float, float, float]:
    """(exit share, top-1 agreement, mean KL(exit || full)) with ``tokens`` decoded one at a time through the
    exiting backend, against plain decoding's logits at the same positions."""
    backend.split(None)
    backend.truncate(0)
    full = np.concatenate([backend.decode([t]) for t in tokens]).astype(np.float64)
    wrapped = onnx_exit.OnnxConfidence(backend, head, threshold)
    backend.truncate(0)
    got = np.concatenate([wrapped.decode([t]) for t in tokens]).astype(np.float64)
    log_p = full - np.logaddexp.reduce(full, axis=1, keepdims=True)
    log_q = got - np.logaddexp.reduce(got, axis=1, keepdims=True)
    q = np.exp(log_q)
    with np.errstate(invalid="ignore"):                   # 0 * -inf outside an exited step's reduced head
        kl = np.where(q > 0, q * (log_q - log_p), 0.0).sum(1)
    backend.split(None)
    return wrapped.counters.exit_rate, float(np.mean(got.argmax(1) == full.argmax(1))), float(kl.mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gen-tokens", type=int, default=48)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (args.folder / "model.onnx").is_file():
        print(f"no ONNX export at {args.folder}: run benchmarks/onnx_decode.py first (it builds one)", file=sys.stderr)
        return 2
    backend = OnnxBackend.load(args.folder, n_ctx=1024, n_threads=args.threads)
    report: dict = {"model": str(args.folder), "threads": args.threads, "gen_tokens": args.gen_tokens}
    n_layers = backend.n_layers
    tokens = backend.tokenize(default_calibration_text(), add_special=False)
    held_out, fit = tokens[:HELD_OUT_TOKENS], tokens[HELD_OUT_TOKENS:HELD_OUT_TOKENS + FIT_TOKENS]
    ranked = rank_vocab(tokens[HELD_OUT_TOKENS:], backend.n_vocab, [backend.special.eos, backend.special.eot])
    grid = [(e, v) for e in EXIT_LAYERS for v in VOCAB_SIZES]
    heads = dict(zip(grid, onnx_exit.fit_heads(backend, windows_of(fit), ranked, grid, RIDGE)))
    rates = dict(zip(grid, onnx_exit.acceptance(backend, list(heads.values()), windows_of(held_out))))
    print(f"## Exit-head agreement with the full model (ONNX int4, greedy, {len(held_out)} held-out tokens)\n")
    print("| exit after layer | " + " | ".join(f"V={v}" for v in VOCAB_SIZES) + " |")
    print("|---|" + "---|" * len(VOCAB_SIZES))
    for e in EXIT_LAYERS:
        print(f"| {e}{' (full depth)' if e == n_layers else ''} | "
              + " | ".join(f"{rates[e, v]:.3f}" for v in VOCAB_SIZES) + " |")
    report["agreement"] = {f"{e}/{v}": r for (e, v), r in rates.items()}

    def same(outs, ref):
        return f"{sum(a == b for a, b in zip(outs, ref))}/{len(ref)}"

    plain_tok_s, _, plain = decode_speed(backend, PROMPTS, args.gen_tokens)
    backend.split(n_layers)
    halves_tok_s, _, halves = decode_speed(backend, PROMPTS, args.gen_tokens)
    backend.split(None)
    grounded_tok_s, _, grounded = decode_speed(backend, GROUNDED, args.gen_tokens)
    rows = [("plain, whole graph", "-", plain_tok_s, None, same(plain, plain), "free"),
            ("plain, whole graph", "-", grounded_tok_s, None, same(grounded, grounded), "grounded"),
            (f"plain, graph cut at {n_layers} (two sessions)", "-", halves_tok_s, None, same(halves, plain), "free")]
    for (e, v), head in heads.items():
        draft = onnx_exit.SplitDraft(backend, head)
        for k in KS:
            tok_s, acc, outs = decode_speed(backend, PROMPTS, args.gen_tokens, draft, k)
            rows.append((f"lossless self-draft E={e} V={v}", k, tok_s, acc, same(outs, plain), "free"))
        draft.close()
    lookup = onnx_exit.SplitLookup(backend)
    for prompts, ref, kind in ((PROMPTS, plain, "free"), (GROUNDED, grounded, "grounded")):
        for k in KS:
            tok_s, acc, outs = decode_speed(backend, prompts, args.gen_tokens, lookup, k)
            rows.append(("lossless prompt lookup", k, tok_s, acc, same(outs, ref), kind))
    lookup.close()
    print(f"\n## Decode speed, greedy, {args.gen_tokens} tokens x {len(PROMPTS)} prompts, {args.threads} thread(s)\n")
    print("| mode | k | prompts | decode tok/s | vs plain | acceptance | outputs identical to plain |")
    print("|---|---|---|---|---|---|---|")
    for mode, k, tok_s, acc, identical, kind in rows:
        base = plain_tok_s if kind == "free" else grounded_tok_s
        print(f"| {mode} | {k} | {kind} | {tok_s:.1f} | {tok_s / base:.2f}x | "
              f"{'-' if acc is None else f'{acc:.2f}'} | {identical} |")
    report["decode"] = [dict(zip(("mode", "k", "tok_s", "acceptance", "same_tokens", "prompts"), r)) for r in rows]

    print(f"\n## Confidence exit (lossy, CALM), {VOCAB_SIZES[1]}-token head; quality over {QUALITY_TOKENS} "
          "held-out tokens fed one at a time\n")
    print("| exit after layer | threshold | decode tok/s | vs plain | steps exited (generation) | exited (held-out) "
          "| top-1 vs full | KL(exit || full) |")
    print("|---|---|---|---|---|---|---|---|")
    report["confidence"] = []
    for e in CONFIDENCE_LAYERS:
        head = heads[e, VOCAB_SIZES[1]]
        for t in THRESHOLDS:
            wrapped = onnx_exit.OnnxConfidence(backend, head, t)
            tok_s, _, _ = decode_speed(wrapped, PROMPTS, args.gen_tokens)
            rate = wrapped.counters.exit_rate
            share, top1, kl = confidence_quality(backend, head, t, held_out[:QUALITY_TOKENS])
            print(f"| {e} | {t} | {tok_s:.1f} | {tok_s / plain_tok_s:.2f}x | {rate:.2f} | {share:.2f} | "
                  f"{top1:.3f} | {kl:.4f} |")
            report["confidence"].append({"exit_layer": e, "threshold": t, "tok_s": tok_s, "exit_rate": rate,
                                         "held_out_exit_share": share, "top1": top1, "kl_exit_full": kl})
    backend.close()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
