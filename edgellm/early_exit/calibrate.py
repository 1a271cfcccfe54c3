"""Choosing early-exit settings for a bundle by measuring them on this machine, and storing the choice.

``fit_heads`` fits exit heads (least squares from captured hidden states); ``acceptance`` measures how
often a head's greedy token equals the full model's on held-out text; ``decode_speed`` times generation
with and without a draft source. ``calibrate`` runs the grid, keeps the fastest lossless setting, turns it
on only at ``MIN_SPEEDUP`` or more (else records why it stayed off), and writes the head file and the
manifest's ``early_exit`` section.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgellm.early_exit.attach import is_llama_cpp, prompt_lookup, token_source, verified
from edgellm.early_exit.capture import capture
from edgellm.early_exit.draft import Draft, SelfDraft
from edgellm.early_exit.heads import (ExitHead, fit_affine, rank_vocab, read_output_weights, reduced_head,
                                      save_head)
from edgellm.early_exit.speculative import DraftCounters
from edgellm.early_exit.tap import layer_output_name
from edgellm.runtime.generate import collect, plain_tokens, run
from edgellm.runtime.sampling import GenerationSettings

logger = logging.getLogger(__name__)

MIN_SPEEDUP = 1.1               # lossless early exit is switched on only when it measures at least this
WINDOW = 256                    # tokens per capture window
FIT_TOKENS = 2048               # calibration tokens the affine map is fitted on (n_embd² unknowns)
HELD_OUT_TOKENS = 256           # tokens acceptance is measured on (not used for fitting)
RIDGE = 1e-4                    # relative ridge: keeps the normal equations well conditioned on few tokens
HEAD_FILE = "early_exit_head.npz"
SPEED_PROMPTS = ("The history of the printing press", "def parse_config(path):\n    \"\"\"",
                 "Write a short story about a lighthouse keeper.")


def windows_of(tokens: Sequence[int], size: int = WINDOW) -> list[list[int]]:
    return [list(tokens[i:i + size]) for i in range(0, len(tokens), size) if len(tokens[i:i + size]) > 1]


def fit_heads(backend, gguf_path: Path, fit_tokens: Sequence[int], ranked: np.ndarray,
              grid: Sequence[tuple[int, int]], n_layers: int) -> list[ExitHead]:
    """One exit head per (exit layer E, head size V) in ``grid``, over the first V ids of ``ranked``. Below full
    depth an affine map from the state after block E to the final residual stream is fitted on ``fit_tokens``
    (one capture serves every E; the output rows are read once)."""
    weights = read_output_weights(gguf_path, np.asarray(ranked[:max(v for _, v in grid)], np.int64))
    lower = sorted({e for e, _ in grid if e < n_layers})
    target = f"l_out-{n_layers - 1}"            # the final residual stream, before the final norm
    maps = {}
    if lower:
        got = capture(backend, windows_of(fit_tokens), [layer_output_name(e, n_layers) for e in lower] + [target]).hidden
        maps = {e: fit_affine(got[layer_output_name(e, n_layers)], got[target], ridge=RIDGE) for e in lower}
    return [reduced_head(gguf_path, ranked, v, exit_layer=e, affine=maps.get(e), weights=weights) for e, v in grid]


def fit_head(backend, gguf_path: Path, fit_tokens: Sequence[int], ranked: np.ndarray, exit_layer: int,
             vocab_size: int, n_layers: int) -> ExitHead:
    """``fit_heads`` for a single (exit layer, head size)."""
    return fit_heads(backend, gguf_path, fit_tokens, ranked, [(exit_layer, vocab_size)], n_layers)[0]


def acceptance(backend, heads: Sequence[ExitHead], held_out: Sequence[int]) -> list[float]:
    """Per head, the share of held-out positions where its greedy token equals the full model's."""
    names = sorted({layer_output_name(h.exit_layer, h.n_layers) for h in heads})
    got = capture(backend, windows_of(held_out), names, full_top1=True)
    return [float(np.mean(h.predict(got.hidden[layer_output_name(h.exit_layer, h.n_layers)])[0] == got.top1))
            for h in heads]


def decode_speed(backend, prompts: Sequence[str], max_tokens: int, draft: Draft | None = None,
                 k: int = 4) -> tuple[float, float, list[list[int]]]:
    """(generated tokens per second after the first, acceptance rate, tokens per prompt), greedy."""
    settings = GenerationSettings(max_tokens=max_tokens)
    counters, seconds, n, outputs = DraftCounters(), 0.0, 0, []
    for prompt in prompts:
        backend.truncate(0)
        source = plain_tokens if draft is None else token_source(draft, k, counters)
        done = collect(run(backend, [], backend.tokenize(prompt), settings, source=source))
        seconds += done.stats.total_seconds - done.stats.ttft_seconds
        n += max(done.stats.generated_tokens - 1, 0)
        outputs.append(done.tokens)
    backend.truncate(0)
    return (n / seconds if seconds > 0 else 0.0), counters.acceptance, outputs


@dataclass
class Calibration:
    mode: str                            # what the bundle gets by default: "lossless" or "off"
    reason: str
    draft: str | None = None             # "shared", "self" or "prompt-lookup"
    exit_layer: int | None = None
    vocab_size: int | None = None
    k: int | None = None
    threshold: float = 0.5
    acceptance: float | None = None      # measured draft acceptance of the chosen setting
    speedup: float | None = None         # best lossless decode speed over plain, measured here
    plain_tok_s: float | None = None
    measurements: list[dict[str, Any]] = field(default_factory=list)

    def manifest_section(self, head_file: str | None) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if v is not None and k != "measurements"}
        if head_file:
            data["head"] = head_file
        return data


def choose(measurements: list[dict[str, Any]], plain_tok_s: float, min_speedup: float = MIN_SPEEDUP) -> Calibration:
    """The fastest lossless setting, on only at ``min_speedup`` or more. Pure: reads only its arguments."""
    lossless = [m for m in measurements if m.get("mode") == "lossless" and m.get("tok_s")]
    if not lossless or plain_tok_s <= 0:
        return Calibration("off", "nothing was measured", plain_tok_s=plain_tok_s, measurements=measurements)
    best = max(lossless, key=lambda m: m["tok_s"])
    speedup = best["tok_s"] / plain_tok_s
    on = speedup >= min_speedup
    reason = (f"{best['draft']} k={best['k']} decodes {speedup:.2f}x plain here (>= {min_speedup})" if on else
              f"best lossless setting ({best['draft']} k={best['k']}, acceptance {best['acceptance']:.2f}) "
              f"measured {speedup:.2f}x plain, below {min_speedup}x")
    return Calibration("lossless" if on else "off", reason, best["draft"], best.get("exit_layer"),
                       best.get("vocab_size"), best["k"], acceptance=best["acceptance"], speedup=speedup,
                       plain_tok_s=plain_tok_s, measurements=measurements)


def calibrate(bundle_dir: str | Path, *, text: str | None = None, exit_layers: Sequence[int] | None = None,
              vocab_sizes: Sequence[int] = (4096, 16384), ks: Sequence[int] = (2, 4, 8), max_tokens: int = 48,
              min_speedup: float = MIN_SPEEDUP, n_threads: int | None = None, write: bool = True) -> Calibration:
    """Measure early exit for the GGUF or ONNX bundle at ``bundle_dir`` and store heads and settings in it.

    ``exit_layers`` default to full depth only (a reduced head; measured the strongest draft on Gemma 3).
    Acceptance is measured for every (E, V); decode speed for the best head of each E with each k, and for
    prompt lookup. Returns the Calibration (also written to the manifest when ``write``).

    Raises:
        SettingsError: the bundle's model is neither a llama.cpp (GGUF) nor an ONNX model.
        BundleError, ModelLoadError: from loading the bundle.
    """
    from edgellm.converters.imatrix import default_calibration_text
    from edgellm.errors import SettingsError
    from edgellm.runtime import Runtime

    bundle_dir = Path(bundle_dir)
    with Runtime.load(bundle_dir, early_exit="off", n_threads=n_threads, n_threads_batch=n_threads) as rt:
        backend = rt.backend
        llama = is_llama_cpp(backend)
        if not llama and not hasattr(backend, "split"):
            raise SettingsError("early_exit", str(bundle_dir), "calibration needs a GGUF (llama.cpp) or ONNX bundle")
        n_layers = int(backend.metadata[f"{backend.metadata['general.architecture']}.block_count"])
        tokens = backend.tokenize(text if text is not None else default_calibration_text(), add_special=False)
        held_out, fit_tokens = tokens[:HELD_OUT_TOKENS], tokens[HELD_OUT_TOKENS:HELD_OUT_TOKENS + FIT_TOKENS]
        ranked = rank_vocab(tokens[HELD_OUT_TOKENS:], backend.n_vocab, [backend.special.eos, backend.special.eot])
        grid = [(e, min(v, backend.n_vocab)) for e in (exit_layers or (n_layers,)) for v in vocab_sizes]
        if llama:
            heads = fit_heads(backend, Path(rt.info.model_path), fit_tokens, ranked, grid, n_layers)
            rates = acceptance(backend, heads, held_out)
        else:
            from edgellm.early_exit import onnx_exit

            heads = onnx_exit.fit_heads(backend, windows_of(fit_tokens), ranked, grid, RIDGE)
            rates = onnx_exit.acceptance(backend, heads, windows_of(held_out))
        measurements = [{"mode": "acceptance", "exit_layer": h.exit_layer, "vocab_size": h.vocab_size,
                         "acceptance": a} for h, a in zip(heads, rates)]
        plain_tok_s, _, _ = decode_speed(backend, SPEED_PROMPTS, max_tokens)
        measurements += _speed_grid(backend, heads, rates, ks, max_tokens)
        if llama:
            measurements += _shared_grid(backend, heads, ks, max_tokens)      # last: it installs an eval callback
        result = choose(measurements, plain_tok_s, min_speedup)
        logger.info("early exit calibration: %s (%s)", result.mode, result.reason)
        keep = _head_to_keep(heads, rates, result)
        if write:
            _store(bundle_dir, result, keep)
    return result


def _self_draft(backend, head: ExitHead) -> Draft:
    """The self-draft for ``backend``: a sibling llama.cpp context, or the ONNX graph cut at the exit."""
    if is_llama_cpp(backend):
        return verified(backend, SelfDraft(backend, head))[0]
    from edgellm.early_exit.onnx_exit import SplitDraft

    return SplitDraft(backend, head)


def _speed_grid(backend, heads: list[ExitHead], rates: list[float], ks: Sequence[int], max_tokens: int) -> list[dict]:
    rows = []
    best: dict[int, tuple[float, ExitHead]] = {}
    for head, rate in zip(heads, rates):
        if rate > best.get(head.exit_layer, (-1.0, None))[0]:
            best[head.exit_layer] = (rate, head)
    for _, head in best.values():
        measured = _draft_rows(backend, _self_draft, "self", head, ks, max_tokens)
        if measured is None:                         # an ONNX graph that cannot be cut
            break
        rows += measured
    lookup, _ = prompt_lookup(backend)
    try:
        for k in ks:
            tok_s, acc, _ = decode_speed(backend, SPEED_PROMPTS, max_tokens, lookup, k)
            rows.append({"mode": "lossless", "draft": "prompt-lookup", "k": k, "tok_s": tok_s, "acceptance": acc})
    finally:
        lookup.close()
    return rows


def _shared_grid(backend, heads: list[ExitHead], ks: Sequence[int], max_tokens: int) -> list[dict]:
    """Decode speed of the shared draft for every full-depth head and k (none where it is unavailable)."""
    from edgellm.early_exit.shared import SharedDraft

    rows = []
    for head in (h for h in heads if h.full_depth):
        measured = _draft_rows(backend, SharedDraft, "shared", head, ks, max_tokens)
        if measured is None:
            return rows
        rows += measured
    return rows


def _draft_rows(backend, make, name: str, head: ExitHead, ks: Sequence[int], max_tokens: int) -> list[dict] | None:
    """Decode speed of the draft ``make(backend, head)`` for each k (closed afterwards); None, logged, when it
    cannot be built (ValueError)."""
    try:
        draft = make(backend, head)
    except ValueError as exc:
        logger.info("%s draft not measured: %s", name, exc)
        return None
    rows = []
    try:
        for k in ks:
            tok_s, acc, _ = decode_speed(backend, SPEED_PROMPTS, max_tokens, draft, k)
            rows.append({"mode": "lossless", "draft": name, "exit_layer": head.exit_layer,
                         "vocab_size": head.vocab_size, "k": k, "tok_s": tok_s, "acceptance": acc})
    finally:
        draft.close()
    return rows


def _head_to_keep(heads: list[ExitHead], rates: list[float], result: Calibration) -> ExitHead | None:
    """The chosen head; when lossless stays off, the best full-depth one (confidence mode can use it)."""
    if result.mode == "lossless" and result.draft in ("self", "shared"):
        return next(h for h in heads if h.exit_layer == result.exit_layer and h.vocab_size == result.vocab_size)
    full = [(r, h) for h, r in zip(heads, rates) if h.full_depth]
    return max(full, key=lambda rh: rh[0])[1] if full else None


def _store(bundle_dir: Path, result: Calibration, head: ExitHead | None) -> None:
    from edgellm import bundle as bundles
    from edgellm.early_exit.attach import MANIFEST_KEY

    manifest = bundles.read_manifest(bundle_dir)
    files = [f for f in manifest.files if f.path != HEAD_FILE]
    if head is not None:
        save_head(bundle_dir / HEAD_FILE, head)
        files.append(bundles.describe_file(bundle_dir, HEAD_FILE, role="early_exit_head"))
    section = result.manifest_section(HEAD_FILE if head is not None else None)
    if head is not None and result.mode != "lossless":
        section.update(head_exit_layer=head.exit_layer, head_vocab_size=head.vocab_size)
    extra = {**manifest.extra, MANIFEST_KEY: section}
    bundles.write_manifest(bundle_dir, dataclasses.replace(manifest, files=tuple(files), extra=extra))
