"""Hidden states of a llama.cpp model on calibration text, for fitting exit heads and measuring them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edgellm.early_exit.tap import Tap, sibling
from edgellm.runtime.llamacpp import LlamaCppBackend


@dataclass(frozen=True)
class Captured:
    hidden: dict[str, np.ndarray]     # graph node name -> (n_tokens, n_embd) float32
    top1: np.ndarray | None           # (n_tokens,) the full model's greedy next token, when asked for


def capture(backend: LlamaCppBackend, windows: Sequence[Sequence[int]], names: list[str], *,
            full_top1: bool = False) -> Captured:
    """Decode each window (from an empty cache) in a sibling context and keep the named hidden states of
    every position. Without ``full_top1`` the graph stops after the last wanted node (no output head).

    Raises DecodeError or ModelLoadError from llama.cpp, or what the callback raised.
    """
    rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
    seen: list[str] = []

    def keep(name: str, x: np.ndarray) -> bool:
        rows[name].append(x)
        seen.append(name)
        return full_top1 or len(seen) % len(names) != 0    # stop once every name was seen in this call

    tap = Tap(names, keep)
    ctx = sibling(backend, tap, n_ctx=max(len(w) for w in windows))
    top1: list[np.ndarray] = []
    try:
        for window in windows:
            ctx.truncate(0)
            logits = ctx.decode(list(window), "all")      # every row, so the last block keeps them all
            tap.check()
            if full_top1:
                top1.append(np.argmax(logits, axis=-1))
    finally:
        ctx.close()
    hidden = {n: np.concatenate(v) for n, v in rows.items()}
    return Captured(hidden, np.concatenate(top1) if full_top1 else None)
