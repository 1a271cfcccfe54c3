"""Putting early exit on a loaded backend: which draft source, which head, or the confidence wrapper.

The choice is recorded, with the reason for any fallback, in ``Setup.note`` (the runtime shows it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from edgellm.early_exit.draft import Draft, PromptLookup, SelfDraft
from edgellm.early_exit.heads import ExitHead, load_head
from edgellm.early_exit.modes import EarlyExitMode, parse_mode
from edgellm.early_exit.speculative import DEFAULT_K
from edgellm.errors import SettingsError

logger = logging.getLogger(__name__)

MANIFEST_KEY = "early_exit"


@dataclass
class Setup:
    mode: EarlyExitMode
    backend: Any                        # what generation drives (a ConfidenceBackend in confidence mode)
    draft: Draft | None = None          # lossless mode's draft source
    k: int = DEFAULT_K
    note: str | None = None             # why a fallback was taken, or where the settings came from
    closers: list = field(default_factory=list)


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

    Raises SettingsError for a bad mode, or confidence mode where there is no full-depth llama.cpp head.
    """
    mode = parse_mode(requested if requested is not None else settings.get("mode", "off"))
    if not mode.on:
        return Setup(mode, backend)
    head = _head(settings, bundle_dir)
    llama = is_llama_cpp(backend)
    k = int(settings.get("k", DEFAULT_K))
    if mode.name == "confidence":
        if head is None or not llama:
            raise SettingsError("early_exit", str(mode), "needs a llama.cpp model with a calibrated exit head "
                                "(run `edgellm exit calibrate BUNDLE` first)")
        from edgellm.early_exit.confidence import ConfidenceBackend

        threshold = mode.threshold if requested is not None else float(settings.get("threshold", mode.threshold))
        wrapped = ConfidenceBackend(backend, head, threshold)
        return Setup(parse_mode(f"confidence:{threshold:g}"), wrapped, note=f"{head.vocab_size}-token head")
    if head is not None and llama and settings.get("draft", "self") == "self":
        draft: Draft = SelfDraft(backend, head, min_margin=float(settings.get("min_margin", 0.0)))
        note = f"self-draft: exit after layer {head.exit_layer}/{head.n_layers}, {head.vocab_size}-token head, k={k}"
    else:
        draft = PromptLookup()
        why = ("the calibration chose it" if settings.get("draft") == "prompt-lookup" else
               "no exit head in the bundle" if head is None else "self-drafting needs the llama.cpp backend")
        note = f"{why}: drafting with prompt lookup (n-grams from the context), k={k}"
    logger.info("early exit lossless: %s", note)
    return Setup(mode, backend, draft, k, note, closers=[draft.close])
