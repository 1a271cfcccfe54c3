"""Putting early exit on a loaded backend: which draft source, which head, or the confidence wrapper.

The choice is recorded, with the reason for any fallback, in ``Setup.note`` (the runtime shows it).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from edgellm.early_exit.draft import Draft, PromptLookup, SelfDraft, Verified
from edgellm.early_exit.heads import ExitHead, load_head, rank_vocab, reduced_head
from edgellm.early_exit.modes import EarlyExitMode, parse_mode
from edgellm.early_exit.speculative import DEFAULT_K, DraftCounters, speculative_tokens
from edgellm.errors import SettingsError
from edgellm.runtime.generate import TokenSource

logger = logging.getLogger(__name__)

MANIFEST_KEY = "early_exit"
DEFAULT_VOCAB = 16384           # rows of the reduced head when the bundle has none (97% top-1 on Gemma 3 270M)


@dataclass
class Setup:
    mode: EarlyExitMode
    backend: Any                        # what generation drives (a ConfidenceBackend in confidence mode)
    draft: Draft | None = None          # lossless mode's draft source
    k: int = DEFAULT_K
    note: str | None = None             # why a fallback was taken, or where the settings came from
    closers: list = field(default_factory=list)

    def token_source(self, counters: DraftCounters) -> TokenSource:
        """The draft-and-verify loop for ``edgellm.runtime.generate.run`` (lossless mode only)."""
        return token_source(self.draft, self.k, counters)


def token_source(draft: Draft, k: int, counters: DraftCounters) -> TokenSource:
    """``shared_tokens`` for the shared draft (it verifies without decoding), else ``speculative_tokens``."""
    from edgellm.early_exit.shared import SharedDraft, shared_tokens

    loop = shared_tokens if isinstance(draft, SharedDraft) else speculative_tokens
    return functools.partial(loop, draft=draft, k=k, counters=counters)


# keys of the manifest's early_exit section (docs/bundle.md); written by calibrate.py
SECTION_KEYS = frozenset({"mode", "reason", "draft", "exit_layer", "vocab_size", "k", "threshold", "acceptance",
                          "speedup", "plain_tok_s", "head", "head_exit_layer", "head_vocab_size", "min_margin"})


def bundle_settings(extra: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The manifest's ``early_exit`` section ({} when absent).

    Raises BundleError for a section that is not an object or has unknown keys (our own file: strict)."""
    section = (extra or {}).get(MANIFEST_KEY) or {}
    if not isinstance(section, dict) or set(section) - SECTION_KEYS:
        from edgellm.errors import BundleError

        unknown = sorted(set(section) - SECTION_KEYS) if isinstance(section, dict) else [repr(section)]
        raise BundleError(MANIFEST_KEY, f"unknown or malformed early_exit entries: {', '.join(unknown)}; "
                                        f"known: {', '.join(sorted(SECTION_KEYS))}")
    return dict(section)


def is_llama_cpp(backend: Any) -> bool:
    """Whether ``backend`` is a llama.cpp context (ids in edgellm/backends.py): self-drafting and the confidence
    exit need its eval callback."""
    return str(getattr(backend, "id", "")).startswith("llama.cpp")


def _head(settings: Mapping[str, Any], bundle_dir: Path | None) -> ExitHead | None:
    path = settings.get("head")
    if not path or bundle_dir is None:
        return None
    return load_head(bundle_dir / path)


def attach(backend: Any, requested: str | None, settings: Mapping[str, Any], bundle_dir: Path | None) -> Setup:
    """Early exit for ``backend``: ``requested`` ("off", "lossless", "confidence[:T]") or, when None, the
    bundle's calibrated choice (``settings`` is the manifest section).

    Raises SettingsError for a bad mode, or confidence mode without a calibrated head (on llama.cpp a full-depth
    one; on ONNX a graph that can be cut).
    """
    mode = parse_mode(requested if requested is not None else settings.get("mode", "off"))
    if not mode.on:
        return Setup(mode, backend)
    head = _head(settings, bundle_dir)
    k = int(settings.get("k", DEFAULT_K))
    if mode.name == "confidence":
        threshold = mode.threshold if requested is not None else float(settings.get("threshold", mode.threshold))
        wrapped, note = _confidence(backend, head, threshold, mode)
        return Setup(parse_mode(f"confidence:{threshold:g}"), wrapped, note=note)
    draft, note = _lossless_draft(backend, head, settings, k)
    logger.info("early exit lossless: %s", note)
    return Setup(mode, backend, draft, k, note, closers=[draft.close])


def _confidence(backend: Any, head: ExitHead | None, threshold: float, mode: EarlyExitMode) -> tuple[Any, str]:
    """The confidence wrapper: llama.cpp exits after the last block (a full-depth head); ONNX at the head's
    layer, the upper layers' cache filled from the exit state (CALM)."""
    if head is None:
        raise SettingsError("early_exit", str(mode), "needs a calibrated exit head "
                            "(run `edgellm exit calibrate BUNDLE` first)")
    if is_llama_cpp(backend):
        from edgellm.early_exit.confidence import ConfidenceBackend

        return ConfidenceBackend(backend, head, threshold), f"{head.vocab_size}-token head after the last block"
    from edgellm.early_exit.onnx_exit import OnnxConfidence

    try:
        wrapped = OnnxConfidence(backend, head, threshold)
    except ValueError as exc:
        raise SettingsError("early_exit", str(mode), str(exc)) from None
    return wrapped, (f"{head.vocab_size}-token head after layer {head.exit_layer}/{head.n_layers}"
                     + (", upper layers' KV filled from the exit state" if not head.full_depth else ""))


def _lossless_draft(backend: Any, head: ExitHead | None, settings: Mapping[str, Any], k: int) -> tuple[Draft, str]:
    """The draft source for lossless mode and a note saying which and why.

    On the llama.cpp CPU backend the shared draft is the default (the bundle's full-depth head, else one ranked on
    edgellm's calibration text); a calibration that chose another source is followed.
    """
    chosen = settings.get("draft")
    llama = is_llama_cpp(backend)
    problem = None
    if llama and chosen in (None, "shared") and (head is None or head.full_depth):
        from edgellm.early_exit.shared import SharedDraft

        ranked = head if head is not None else default_head(backend)
        try:
            shared = SharedDraft(backend, ranked)
        except ValueError as exc:
            problem = str(exc)
        else:
            where = "the bundle's" if head is not None else "edgellm's calibration text's"
            return shared, (f"shared draft: full depth, {ranked.vocab_size}-token head ({where} ranking), "
                            f"k={k}, one KV cache, verification by the model's own output head")
    margin = float(settings.get("min_margin", 0.0))
    where = f"exit after layer {head.exit_layer}/{head.n_layers}, " if head is not None else ""
    if head is not None and llama and chosen in (None, "self", "shared"):
        draft, how = verified(backend, SelfDraft(backend, head, min_margin=margin))
        return draft, (f"self-draft: {where}{head.vocab_size}-token head, k={k}, {how}"
                       + (f" (the shared draft is unavailable: {problem})" if problem else ""))
    if head is not None and not llama and chosen in (None, "self"):
        from edgellm.early_exit.onnx_exit import SplitDraft

        try:
            return (SplitDraft(backend, head, min_margin=margin),
                    f"self-draft on the graph cut at the exit: {where}{head.vocab_size}-token head, k={k}, "
                    "lower-half cache shared with verification")
        except ValueError as exc:
            problem = str(exc)
    why = ("the calibration chose it" if chosen == "prompt-lookup" else
           f"{'the shared draft' if llama else 'self-drafting'} is unavailable: {problem}" if problem else
           "no exit head in the bundle")
    lookup, how = prompt_lookup(backend)
    return lookup, f"{why}: drafting with prompt lookup (n-grams from the context), k={k}, {how}"


EXACT = "verified through the blocks one token at a time and the output head at once"
BATCHED = ("verified in one batched decode (greedy output may differ from plain decoding where the batched "
           "kernels round a near tie the other way)")


def prompt_lookup(backend: Any) -> tuple[Draft, str]:
    """Prompt lookup for ``backend`` and how its guesses are verified (``verified``); on ONNX the graph is cut
    before the final norm for it (``onnx_exit.SplitLookup``) where it can be."""
    if not is_llama_cpp(backend) and hasattr(backend, "split"):
        from edgellm.early_exit.onnx_exit import SplitLookup

        try:
            return SplitLookup(backend), EXACT
        except ValueError as exc:
            return PromptLookup(), f"{BATCHED}: {exc}"
    return verified(backend, PromptLookup())


def verified(backend: Any, draft: Draft) -> tuple[Draft, str]:
    """``draft`` verified exactly where it can be (a draft with its own ``verify``; on llama.cpp's CPU backend a
    ``shared.HeadVerifier``, which installs an eval callback on ``backend``), and a note saying how."""
    if hasattr(draft, "verify"):
        return draft, EXACT
    if not is_llama_cpp(backend):
        return draft, BATCHED
    from edgellm.early_exit.shared import HeadVerifier

    try:
        return Verified(draft, HeadVerifier(backend)), EXACT
    except ValueError as exc:
        return draft, f"{BATCHED}: {exc}"


def default_head(backend: Any, vocab_size: int = DEFAULT_VOCAB) -> ExitHead:
    """A full-depth reduced head over the ``vocab_size`` tokens most frequent in edgellm's calibration text
    (end-of-generation tokens first), for lossless mode on a model nobody calibrated."""
    from edgellm.converters.imatrix import default_calibration_text

    ranked = rank_vocab(backend.tokenize(default_calibration_text(), add_special=False), backend.n_vocab,
                        [backend.special.eos, backend.special.eot])
    return reduced_head(backend.path, ranked, min(vocab_size, backend.n_vocab))
