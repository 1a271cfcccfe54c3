"""Early-exit benchmark on Gemma 3 270M (Q4_K_M from the [demo] package), run by hand:

    .venv/bin/python benchmarks/early_exit.py [--threads N] [--gen-tokens N] [--json FILE]

Side by side in one run, on this machine:
1. greedy agreement of exit heads with the full model on held-out text, per exit layer E (affine head fitted
   by least squares on the bundled calibration text; E = 18 is full depth) and head size V;
2. decode tok/s of plain greedy decoding and of lossless draft-and-verify (self-draft per V and k, prompt
   lookup on free and on grounded prompts), with acceptance and whether the tokens equal plain greedy;
3. the confidence exit (lossy) per threshold: decode tok/s, share of steps that exited, and its quality
   teacher-forced on held-out text (top-1 agreement with the full model, reverse KLD KL(exit || full)).
Ratios are against plain decoding measured in the same run with the same prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from edgellm.converters.imatrix import default_calibration_text
from edgellm.early_exit.attach import prompt_lookup, verified
from edgellm.early_exit.calibrate import FIT_TOKENS, HELD_OUT_TOKENS, acceptance, decode_speed, fit_heads
from edgellm.early_exit.confidence import ConfidenceBackend
from edgellm.early_exit.draft import SelfDraft
from edgellm.early_exit.heads import probability_margin, rank_vocab, reduced_head
from edgellm.early_exit.shared import SharedDraft
from edgellm.early_exit.tap import FINAL_NAME, Tap, sibling
from edgellm.runtime.llamacpp import LlamaCppBackend
from edgellm.testing import gemma

PROMPTS = ("The history of the printing press begins", "def parse_config(path):\n    \"\"\"Read a config file",
           "Write a short story about a lighthouse keeper.")
DOCUMENT = ("The lighthouse at Cape Wrath was built in 1828 by Robert Stevenson. It stands 20 metres tall and its "
            "light can be seen 22 nautical miles away. The keepers left in 1998 when the light was automated. ")
GROUNDED = (f"{DOCUMENT}\nQuestion: When was the lighthouse at Cape Wrath built, and by whom?\nAnswer: The "
            f"lighthouse at Cape Wrath", f"Repeat this text exactly.\n{DOCUMENT}\nRepeated: The lighthouse")
EXIT_LAYERS = (9, 12, 15, 18)
VOCAB_SIZES = (4096, 16384, 65536)
KS = (1, 2, 4)
SHARED_KS = (4, 8)
THRESHOLDS = (0.9, 0.7, 0.5, 0.3)
QUALITY_WINDOW = 64


def confidence_quality(backend, head, held_out, thresholds):
    """Teacher-forced on ``held_out``: per threshold, (exit share, top-1 agreement, mean KL(exit || full))."""
    rows: list[np.ndarray] = []
    tap = Tap([FINAL_NAME], lambda _n, x: rows.append(x) or True)
    ctx = sibling(backend, tap, n_ctx=QUALITY_WINDOW)
    margins, agree, kl = [], [], []
    try:
        for i in range(0, len(held_out) - 1, QUALITY_WINDOW):
            window = held_out[i:i + QUALITY_WINDOW]
            ctx.truncate(0)
            rows.clear()
            full = ctx.decode(window, "all").astype(np.float64)                 # (n, n_vocab)
            exit_logits = head.logits(np.concatenate(rows)).astype(np.float64)  # (n, V)
            margins.append(probability_margin(exit_logits))
            agree.append(head.vocab_ids[exit_logits.argmax(1)] == full.argmax(1))
            log_p = full - np.logaddexp.reduce(full, axis=1, keepdims=True)
            log_q = exit_logits - np.logaddexp.reduce(exit_logits, axis=1, keepdims=True)
            kl.append((np.exp(log_q) * (log_q - log_p[:, head.vocab_ids])).sum(1))
    finally:
        ctx.close()
    margins, agree, kl = (np.concatenate(x) for x in (margins, agree, kl))
    out = {}
    for t in thresholds:
        exits = margins >= t
        out[t] = (float(exits.mean()), float(np.where(exits, agree, True).mean()), float(np.where(exits, kl, 0).mean()))
    return out


def shared_rows(backend, ranked, gen_tokens: int, plain_tokens) -> list[tuple]:
    """Decode rows of the shared draft per V and k (it installs, then removes, an eval callback on ``backend``)."""
    rows = []
    for v in VOCAB_SIZES[:2]:
        draft = SharedDraft(backend, reduced_head(backend.path, ranked, v))
        for k in SHARED_KS:
            tok_s, acc, outs = decode_speed(backend, PROMPTS, gen_tokens, draft, k)
            same = f"{sum(a == b for a, b in zip(outs, plain_tokens))}/{len(plain_tokens)}"
            rows.append((f"lossless shared draft V={v}", k, tok_s, acc, same, "free"))
        draft.close()
    backend.install_tap(None)
    return rows


def shared_only(backend, ranked, args) -> int:
    """Plain greedy against the shared draft, alternating three times so drift hits both alike."""
    plain, shared = [], []
    for _ in range(3):
        tok_s, _, plain_tokens = decode_speed(backend, PROMPTS, args.gen_tokens)
        plain.append(tok_s)
        shared.append(shared_rows(backend, ranked, args.gen_tokens, plain_tokens))
    print(f"## Shared draft vs plain, greedy, {args.gen_tokens} tokens x {len(PROMPTS)} prompts, "
          f"{args.threads} thread(s), 3 alternating runs\n")
    print("| draft | k | decode tok/s (median) | vs plain (median of per-run ratios) | acceptance | identical |")
    print("|---|---|---|---|---|---|")
    print(f"| plain | - | {np.median(plain):.1f} | 1.00x | - | - |")
    for i, (mode, k, _, acc, same, _) in enumerate(shared[0]):
        speeds = [run[i][2] for run in shared]
        ratios = [run[i][2] / p for run, p in zip(shared, plain)]
        print(f"| {mode} | {k} | {np.median(speeds):.1f} | {np.median(ratios):.2f}x | {acc:.2f} | {same} |")
    backend.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gen-tokens", type=int, default=48)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--shared-only", action="store_true",
                        help="only plain decoding against the shared draft (section 2's shared rows)")
    args = parser.parse_args()
    path = gemma.gguf_path()
    backend = LlamaCppBackend.load(path, n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads)
    report: dict = {"model": path.name, "threads": args.threads, "gen_tokens": args.gen_tokens}
    n_layers = int(backend.metadata["gemma3.block_count"])
    tokens = backend.tokenize(default_calibration_text(), add_special=False)
    held_out, fit_tokens = tokens[:HELD_OUT_TOKENS], tokens[HELD_OUT_TOKENS:HELD_OUT_TOKENS + FIT_TOKENS]
    ranked = rank_vocab(tokens[HELD_OUT_TOKENS:], backend.n_vocab, [backend.special.eos, backend.special.eot])

    if args.shared_only:
        return shared_only(backend, ranked, args)
    t = time.perf_counter()
    grid = [(e, v) for e in EXIT_LAYERS for v in VOCAB_SIZES]
    heads = dict(zip(grid, fit_heads(backend, path, fit_tokens, ranked, grid, n_layers)))
    fit_seconds = time.perf_counter() - t
    rates = dict(zip(heads, acceptance(backend, list(heads.values()), held_out)))
    print(f"## Exit-head agreement with the full model (greedy, {len(held_out)} held-out tokens; "
          f"heads fitted in {fit_seconds:.0f} s)\n")
    print("| exit after layer | " + " | ".join(f"V={v}" for v in VOCAB_SIZES) + " |")
    print("|---|" + "---|" * len(VOCAB_SIZES))
    for e in EXIT_LAYERS:
        print(f"| {e}{' (full depth)' if e == n_layers else ''} | " + " | ".join(f"{rates[e, v]:.3f}" for v in VOCAB_SIZES) + " |")
    report["agreement"] = {f"{e}/{v}": r for (e, v), r in rates.items()}

    plain_tok_s, _, plain_tokens = decode_speed(backend, PROMPTS, args.gen_tokens)
    grounded_tok_s, _, grounded_tokens = decode_speed(backend, GROUNDED, args.gen_tokens)
    def same(outs, ref):
        return f"{sum(a == b for a, b in zip(outs, ref))}/{len(ref)}"

    rows = [("plain", "-", plain_tok_s, None, same(plain_tokens, plain_tokens), "free"),
            ("plain", "-", grounded_tok_s, None, same(grounded_tokens, grounded_tokens), "grounded")]
    for v in VOCAB_SIZES:
        draft, _ = verified(backend, SelfDraft(backend, heads[n_layers, v]))
        for k in KS:
            tok_s, acc, outs = decode_speed(backend, PROMPTS, args.gen_tokens, draft, k)
            rows.append((f"lossless self-draft E={n_layers} V={v}", k, tok_s, acc, same(outs, plain_tokens), "free"))
        draft.close()
    lookup, _ = prompt_lookup(backend)
    for prompts, ref, kind in ((PROMPTS, plain_tokens, "free"), (GROUNDED, grounded_tokens, "grounded")):
        for k in KS:
            tok_s, acc, outs = decode_speed(backend, prompts, args.gen_tokens, lookup, k)
            rows.append(("lossless prompt lookup", k, tok_s, acc, same(outs, ref), kind))
    lookup.close()
    rows += shared_rows(backend, ranked, args.gen_tokens, plain_tokens)
    print(f"\n## Decode speed, greedy, {args.gen_tokens} tokens x {len(PROMPTS)} prompts, {args.threads} thread(s)\n")
    print("| mode | k | prompts | decode tok/s | vs plain | acceptance | outputs identical to plain |")
    print("|---|---|---|---|---|---|---|")
    for mode, k, tok_s, acc, identical, kind in rows:
        base = plain_tok_s if kind == "free" else grounded_tok_s
        print(f"| {mode} | {k} | {kind} | {tok_s:.1f} | {tok_s / base:.2f}x | "
              f"{'-' if acc is None else f'{acc:.2f}'} | {identical} |")
    report["decode"] = [dict(zip(("mode", "k", "tok_s", "acceptance", "same_tokens", "prompts"), r)) for r in rows]

    head = heads[n_layers, VOCAB_SIZES[1]]
    quality = confidence_quality(backend, head, held_out, THRESHOLDS)
    print(f"\n## Confidence exit (lossy), full depth with the {head.vocab_size}-token head\n")
    print("| threshold | decode tok/s | vs plain | steps exited (generation) | exited (held-out) | "
          "top-1 vs full | KL(exit || full) |")
    print("|---|---|---|---|---|---|---|")
    report["confidence"] = []
    for t in THRESHOLDS:
        wrapped = ConfidenceBackend(backend, head, t)
        tok_s, _, _ = decode_speed(wrapped, PROMPTS, args.gen_tokens)
        wrapped._ctx.close()                         # keep the shared model: the benchmark still uses it
        share, top1, kl = quality[t]
        print(f"| {t} | {tok_s:.1f} | {tok_s / plain_tok_s:.2f}x | {wrapped.counters.exit_rate:.2f} | {share:.2f} | "
              f"{top1:.3f} | {kl:.4f} |")
        report["confidence"].append({"threshold": t, "tok_s": tok_s, "exit_rate": wrapped.counters.exit_rate,
                                     "held_out_exit_share": share, "top1": top1, "kl_exit_full": kl})
    backend.close()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
