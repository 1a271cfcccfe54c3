"""Early exit on the ONNX backend, through the decoder graph cut at the exit layer (``OnnxBackend.split``).

* ``SplitDraft`` (lossless): the lower part drafts one token at a time (its cache entries and exit states
  are those of plain decoding, computed once); verification (``OnnxBackend.verify``) reuses them, runs the
  upper layers one token at a time and the output head once over the k + 1 states. ``SplitLookup``: prompt
  lookup verified the same way on the graph cut before the final norm.
* ``OnnxConfidence`` (lossy, CALM): each one-token step runs the lower part; when the exit head's margin
  passes the threshold, the fill graph writes the upper layers' K/V from the exit state and the reduced
  head's logits are returned; otherwise the upper stages run as usual.
* ``states``/``fit_heads``/``acceptance``: exit heads fitted to the ONNX graph's own hidden states, with the
  output rows read from its weights file.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from edgellm.early_exit.confidence import ExitCounters
from edgellm.early_exit.draft import PromptLookup
from edgellm.early_exit.heads import ExitHead, OutputWeights, fit_affine, probability_margin, reduced_head
from edgellm.runtime.base import LogitsFor, output_indices


def output_weights(backend: Any, ids: np.ndarray) -> OutputWeights:
    """The output rows ``ids`` and final norm of the backend's ONNX graph (see ``split.head_weights``)."""
    from edgellm.converters.onnx.split import head_weights

    got = head_weights(backend.folder.graph, backend.folder.root, ids)
    return OutputWeights(got.rows, got.norm_weight, got.norm_eps, got.softcap, backend.n_layers)


def states(backend: Any, windows: Sequence[Sequence[int]], exit_layers: Sequence[int], *,
           full_top1: bool = False) -> tuple[dict[int, np.ndarray], np.ndarray | None]:
    """The residual stream after each of ``exit_layers`` blocks (n_layers: before the final norm) for every
    position of ``windows`` (each from an empty cache), ({E: (n_tokens, hidden) float32}, full top-1 or None).
    The graph is split at each E in turn and joined again at the end."""
    hidden: dict[int, np.ndarray] = {}
    top1: list[np.ndarray] = []
    layers = sorted(set(exit_layers))
    try:
        for e in layers:
            backend.split(e)
            rows = []
            for window in windows:
                backend.truncate(0)
                rows.append(backend.lower(list(window)))
                if full_top1 and e == layers[0]:        # the upper stages reuse the lower part's states
                    top1.append(np.argmax(backend.decode(list(window), "all"), axis=-1))
            hidden[e] = np.concatenate(rows)
    finally:
        backend.split(None)
    return hidden, (np.concatenate(top1) if full_top1 else None)


def fit_heads(backend: Any, fit_windows: Sequence[Sequence[int]], ranked: np.ndarray,
              grid: Sequence[tuple[int, int]], ridge: float) -> list[ExitHead]:
    """``calibrate.fit_heads`` for an ONNX graph: one head per (E, V), affine maps fitted from the lower
    half's states to the final residual stream."""
    n_layers = backend.n_layers
    weights = output_weights(backend, np.asarray(ranked[:max(v for _, v in grid)], np.int64))
    lower = sorted({e for e, _ in grid if e < n_layers})
    maps = {}
    if lower:
        got, _ = states(backend, fit_windows, lower + [n_layers])
        maps = {e: fit_affine(got[e], got[n_layers], ridge=ridge) for e in lower}
    return [reduced_head(backend.path, ranked, v, exit_layer=e, affine=maps.get(e), weights=weights) for e, v in grid]


def acceptance(backend: Any, heads: Sequence[ExitHead], windows: Sequence[Sequence[int]]) -> list[float]:
    """Per head, the share of positions of ``windows`` where its greedy token equals the full model's."""
    got, top1 = states(backend, windows, [h.exit_layer for h in heads], full_top1=True)
    return [float(np.mean(h.vocab_ids[np.argmax(h.logits_from_residual(got[h.exit_layer]), axis=-1)] == top1))
            for h in heads]


class SplitDraft:
    """Lossless drafting on a split ONNX graph: the lower part and the exit head guess up to k tokens, one at
    a time; their states and cache entries stay for verification (``verify``), which runs the upper layers
    one token at a time and the output head once over all of them."""

    name = "self"

    def __init__(self, backend: Any, head: ExitHead, *, min_margin: float = 0.0) -> None:
        backend.split(head.exit_layer)                    # raises ValueError where the graph cannot be cut
        self.backend, self.head, self.min_margin = backend, head, min_margin

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        b = self.backend
        if b.n_past != len(context) - 1:                  # not the draft-and-verify loop's layout: no guess
            return []
        b.truncate(b.n_past)                              # states left ahead by an earlier round
        token, out = context[-1], []
        while len(out) < k and b.n_past + len(out) + 1 < b.n_ctx:
            logits = self.head.logits_from_residual(b.lower([token]))
            token = int(self.head.vocab_ids[np.argmax(logits[0])])
            out.append(token)
            if probability_margin(logits)[0] < self.min_margin:
                break
        return out

    def verify(self, tokens: Sequence[int]) -> np.ndarray:
        """The full model's logits for ``tokens``, as one-token steps compute them (``OnnxBackend.verify``)."""
        return self.backend.verify(tokens)

    def close(self) -> None:
        self.backend.split(None)            # the whole graph again (nothing when the backend is closed)


class SplitLookup(PromptLookup):
    """Prompt lookup on the ONNX graph cut before the final norm, so verification runs the blocks one token at
    a time, as plain decoding does, and only the output head over all the guesses (``OnnxBackend.verify``):
    greedy output is plain decoding's token for token."""

    def __init__(self, backend: Any) -> None:
        super().__init__()
        backend.split(backend.n_layers)                  # raises ValueError where the graph cannot be cut
        self.backend = backend

    def verify(self, tokens: Sequence[int]) -> np.ndarray:
        return self.backend.verify(tokens)

    def close(self) -> None:
        self.backend.split(None)


class OnnxConfidence:
    """A Backend (see ``edgellm.runtime.base``) over a split ONNX graph with CALM's exit at the head's layer.
    Everything but ``decode`` is the wrapped backend's own."""

    def __init__(self, backend: Any, head: ExitHead, threshold: float) -> None:
        backend.split(head.exit_layer)
        self._backend, self.head, self.threshold = backend, head, threshold
        self.counters = ExitCounters()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    @property
    def n_past(self) -> int:
        return self._backend.n_past

    def decode(self, tokens: Sequence[int], logits_for: LogitsFor = "last") -> np.ndarray:
        if len(tokens) != 1 or len(output_indices(1, logits_for)) != 1:
            return self._backend.decode(tokens, logits_for)
        self.counters.steps += 1
        logits = self.head.logits_from_residual(self._backend.lower(tokens))      # (1, V)
        if probability_margin(logits)[0] < self.threshold:
            return self._backend.decode(tokens, logits_for)                    # reuses the lower part's state
        self._backend.fill()                                                   # upper layers' K/V from the exit
        self.counters.exits += 1
        return self.head.full_row(logits[0], self._backend.n_vocab)

    def close(self) -> None:
        self._backend.close()
