"""Quality of a model on a text: perplexity, and against a reference model KL divergence and top-1 agreement.

Scoring follows llama.cpp's ``llama-perplexity``: the text is cut into consecutive, non-overlapping
windows of ``n_ctx`` tokens (BOS, when the model uses one, then ``n_ctx - 1`` text tokens; the last window
may be shorter). Each window is decoded from an empty cache; its first half is context only and the
predictions in its second half are scored, so every scored token sees at least ``n_ctx / 2`` tokens of
context and no token is scored twice.

Memory stays flat: logits come from the runtime in groups of ``group`` positions, (group, n_vocab) float32
per model (32 x 262144 x 4 B = 32 MiB for Gemma), and only per-token numbers (NLL, KLD, top-1 match) are
kept for the whole text.

KL divergence is KL(reference || model) per scored position, in nats, as llama-perplexity reports it.

llama.cpp's CPU kernels give slightly different logits for different decode shapes. Measured on Gemma 270M
Q4_K_M: a window decoded in one call versus in groups moves perplexity by up to about 2% on a few hundred
tokens; one-token decoding versus batches, and flash attention on versus off, each differ by a mean KLD of
about 0.006, as much as the whole Q4_K_M quantization costs this model. So the model and the reference are
always decoded with the same shapes, and ``group`` is fixed by default: compare numbers taken with the same
``n_ctx`` and ``group`` on the same build.

The default text, ``edgellm/data/eval.txt`` (about 3.2k Gemma tokens: 6 windows of 512), holds a short
essay written for this project followed by docstrings and source excerpts of CPython standard-library
modules (heapq, bisect, textwrap, functools, contextlib, statistics, graphlib, ipaddress; PSF License).
It shares no text with ``calibration.txt``, so a model calibrated on one is not scored on the same words.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgellm.errors import EvalTextError, TokenizerMismatchError

logger = logging.getLogger(__name__)

DEFAULT_N_CTX = 512
DEFAULT_GROUP = 32            # positions per logits request (see module docstring for the memory)
DEFAULT_TEXT = "eval.txt"     # in edgellm/data
KLD_PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Comparison:
    """The model against a reference model on the same scored positions."""

    reference_path: str
    reference_perplexity: float
    kld_mean: float               # nats per token
    kld_median: float
    kld_p90: float
    kld_p99: float
    kld_max: float
    top1_agreement: float         # share of positions whose argmax token is the same in both models


@dataclass(frozen=True)
class EvalResult:
    model_path: str
    text_source: str              # the file scored, or "edgellm/data/eval.txt"
    n_ctx: int
    text_tokens: int              # tokens of the text (without BOS) that were windowed
    windows: int
    scored_tokens: int
    mean_nll: float               # nats per scored token
    perplexity: float             # exp(mean_nll)
    perplexity_stderr: float      # delta method: perplexity * standard error of mean_nll
    seconds: float
    comparison: Comparison | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_text() -> str:
    """The evaluation text shipped with edgellm (``edgellm/data/eval.txt``)."""
    return resources.files("edgellm").joinpath("data", DEFAULT_TEXT).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------
# Pure parts: windows, which positions are scored, per-position numbers from logits.

def windows(n_text_tokens: int, n_ctx: int, n_prefix: int) -> list[tuple[int, int]]:
    """[begin, end) ranges of text tokens, ``n_ctx - n_prefix`` per window (the last may be shorter)."""
    per_window = n_ctx - n_prefix
    if per_window < 2:
        raise ValueError(f"n_ctx {n_ctx} leaves fewer than 2 text tokens per window")
    return [(b, min(b + per_window, n_text_tokens)) for b in range(0, n_text_tokens, per_window)]


def scored_positions(window_len: int) -> range:
    """Positions whose logits are scored in a window of ``window_len`` tokens: the second half.

    The logits at position j predict the token at j + 1, so the last position has nothing to score.
    """
    return range(window_len // 2, window_len - 1)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (rows, n_vocab) float32 logits, in place; returns the same array."""
    logits -= logits.max(axis=1, keepdims=True)
    sums = np.exp(logits).sum(axis=1, dtype=np.float64, keepdims=True)
    logits -= np.log(sums).astype(np.float32)
    return logits


def token_nll(logp: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(rows,) negative log-likelihood in nats of ``targets`` under (rows, n_vocab) log-probabilities."""
    return -logp[np.arange(len(targets)), targets].astype(np.float64)


def kl_divergence(logp_ref: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """(rows,) KL(ref || model) in nats from two (rows, n_vocab) log-probability arrays."""
    diff = logp_ref - logp
    return np.einsum("ij,ij->i", np.exp(logp_ref), diff, dtype=np.float64)


def perplexity_stats(nll: np.ndarray) -> tuple[float, float, float]:
    """(mean NLL, perplexity, perplexity standard error) of per-token NLLs."""
    mean = float(nll.mean())
    stderr = float(nll.std(ddof=1) / math.sqrt(len(nll))) if len(nll) > 1 else 0.0
    ppl = math.exp(mean)
    return mean, ppl, ppl * stderr


# ---------------------------------------------------------------------------------------------------------
# Streaming the logits of one window in groups.

def window_logits(runtime: Any, tokens: list[int], group: int) -> Iterator[tuple[range, np.ndarray]]:
    """Decode ``tokens`` from position 0 and yield (positions, (len(positions), n_vocab) logits) for the
    scored positions, ``group`` at a time; tokens are decoded only as far as each group needs."""
    scored = scored_positions(len(tokens))
    decoded = 0
    for first in range(scored.start, scored.stop, group):
        positions = range(first, min(first + group, scored.stop))
        end = positions.stop          # decode through the last position that needs logits
        # tokens[:decoded] are already in the runtime's KV cache: only tokens[decoded:end] are evaluated.
        logits = runtime.logits(tokens[:end], start=decoded, positions=list(positions))
        decoded = end
        yield positions, logits


def check_same_tokenizer(model: Any, reference: Any, text: str) -> list[int]:
    """Token ids of ``text`` after checking both runtimes tokenize it the same way.

    Raises:
        TokenizerMismatchError: different vocabulary sizes, BOS handling or token ids.
    """
    names = (str(model.info.model_path), str(reference.info.model_path))
    if model.info.n_vocab != reference.info.n_vocab:
        raise TokenizerMismatchError(*names, f"vocabularies of {model.info.n_vocab} and "
                                             f"{reference.info.n_vocab} tokens")
    if model.tokenize("", add_special=True) != reference.tokenize("", add_special=True):
        raise TokenizerMismatchError(*names, "they add different special tokens (BOS)")
    ids = model.tokenize(text, add_special=False)
    ref_ids = reference.tokenize(text, add_special=False)
    if ids != ref_ids:
        at = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), min(len(ids), len(ref_ids)))
        raise TokenizerMismatchError(*names, f"the text tokenizes differently from token {at} on")
    return ids


@dataclass
class _Totals:
    """Per-scored-token numbers gathered over all windows."""

    windows: int = 0
    nll: list[np.ndarray] = field(default_factory=list)
    ref_nll: list[np.ndarray] = field(default_factory=list)
    kld: list[np.ndarray] = field(default_factory=list)
    agree: list[np.ndarray] = field(default_factory=list)

    def add_group(self, logits: np.ndarray, ref_logits: np.ndarray | None, targets: np.ndarray) -> None:
        logp = log_softmax(logits)
        self.nll.append(token_nll(logp, targets))
        if ref_logits is None:
            return
        ref_logp = log_softmax(ref_logits)
        self.ref_nll.append(token_nll(ref_logp, targets))
        self.kld.append(kl_divergence(ref_logp, logp))
        self.agree.append(logp.argmax(axis=1) == ref_logp.argmax(axis=1))


def score(model: Any, text_ids: list[int], *, n_ctx: int, reference: Any = None,
          group: int = DEFAULT_GROUP) -> _Totals:
    """Per-token NLL (and with ``reference`` KLD and top-1 matches) over windows of ``text_ids``.

    Both runtimes must be loaded with a context of at least ``n_ctx`` tokens.
    """
    prefix = model.tokenize("", add_special=True)   # [BOS] for models that use one, else []
    spans = windows(len(text_ids), n_ctx, len(prefix))
    totals = _Totals(windows=len(spans))
    for i, (begin, end) in enumerate(spans):
        tokens = prefix + list(text_ids[begin:end])
        streams = [window_logits(model, tokens, group)]
        if reference is not None:
            streams.append(window_logits(reference, tokens, group))
        for groups in zip(*streams):
            positions, logits = groups[0]
            targets = np.asarray(tokens[positions.start + 1:positions.stop + 1])
            totals.add_group(logits, groups[1][1] if reference is not None else None, targets)
        logger.info("window %d/%d scored", i + 1, len(spans))
    return totals


def _compare(totals: _Totals, reference_path: str) -> Comparison:
    kld = np.concatenate(totals.kld)
    p50, p90, p99 = np.percentile(kld, KLD_PERCENTILES)
    return Comparison(reference_path=reference_path,
                      reference_perplexity=perplexity_stats(np.concatenate(totals.ref_nll))[1],
                      kld_mean=float(kld.mean()), kld_median=float(p50), kld_p90=float(p90), kld_p99=float(p99),
                      kld_max=float(kld.max()), top1_agreement=float(np.concatenate(totals.agree).mean()))


def _read_text(text: str | Path | None) -> tuple[str, str]:
    """(text, where it came from). Raises EvalTextError for an unreadable file."""
    if text is None:
        return default_text(), f"edgellm/data/{DEFAULT_TEXT}"
    if isinstance(text, Path):
        try:
            return text.read_text(encoding="utf-8"), str(text)
        except (OSError, UnicodeDecodeError) as exc:
            raise EvalTextError(str(text), f"cannot read it: {exc}") from exc
    return text, "<text>"


def evaluate(path: str | Path, *, reference: str | Path | None = None, text: str | Path | None = None,
             n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None, max_tokens: int | None = None,
             group: int = DEFAULT_GROUP) -> EvalResult:
    """Perplexity of the model at ``path`` on ``text``; with ``reference``, KLD and top-1 agreement too.

    ``text`` is the text itself (a ``str``), a file (a ``Path``), or None for the shipped eval text.
    ``max_tokens`` keeps only the first tokens of the text (quick checks).

    Raises:
        TokenizerMismatchError: the reference model tokenizes differently.
        EvalTextError: the text cannot be read, or is too short to score a single token.
        ValueError: n_ctx or group too small.
        EdgeLLMError: a model cannot be loaded (ModelLoadError, BundleError, ...).
    """
    from edgellm.runtime import Runtime

    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    body, source = _read_text(text)
    started = time.perf_counter()
    model = Runtime.load(path, n_ctx=n_ctx, n_threads=n_threads)
    ref = None
    try:
        if reference is not None:
            ref = Runtime.load(reference, n_ctx=n_ctx, n_threads=n_threads)
            ids = check_same_tokenizer(model, ref, body)
        else:
            ids = model.tokenize(body, add_special=False)
        ids = ids[:max_tokens] if max_tokens is not None else ids
        totals = score(model, ids, n_ctx=n_ctx, reference=ref, group=group)
    finally:
        model.close()
        if ref is not None:
            ref.close()
    if not totals.nll:
        raise EvalTextError(source, f"{len(ids)} tokens are too few to score any with windows of {n_ctx}")
    nll = np.concatenate(totals.nll)
    mean, ppl, ppl_err = perplexity_stats(nll)
    return EvalResult(model_path=str(path), text_source=source, n_ctx=n_ctx, text_tokens=len(ids),
                      windows=totals.windows, scored_tokens=len(nll), mean_nll=mean,
                      perplexity=ppl, perplexity_stderr=ppl_err, seconds=time.perf_counter() - started,
                      comparison=_compare(totals, str(reference)) if ref is not None else None)
