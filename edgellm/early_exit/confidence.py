"""Confidence exit (lossy, opt-in): at each one-token decode step, score the normed final hidden state with
the reduced-vocabulary head inside llama.cpp's eval callback; when its top-1 minus top-2 probability reaches
the threshold, stop the graph there (the full output head is skipped) and return the reduced head's logits
(every other token at -inf). Otherwise the graph goes on and the full logits come back as usual.

On llama.cpp the exit is taken after the last block only: every block's KV entries are written, so later
tokens see exactly the cache the full model would have. (Exiting below the last block would leave the upper
blocks' KV entries unwritten; CALM fills them from the exit state, which needs graph surgery llama.cpp does
not expose. The ONNX backend does it on a graph cut at the exit layer: ``onnx_exit.OnnxConfidence``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from edgellm.early_exit.heads import ExitHead, probability_margin
from edgellm.early_exit.tap import FINAL_NAME, Tap, sibling
from edgellm.errors import SettingsError
from edgellm.runtime.base import LogitsFor, output_indices


@dataclass
class ExitCounters:
    steps: int = 0          # one-output decode calls
    exits: int = 0          # of which the reduced head answered alone

    @property
    def exit_rate(self) -> float:
        return self.exits / self.steps if self.steps else 0.0


class ConfidenceBackend:
    """A Backend (see ``edgellm.runtime.base``) over a sibling llama.cpp context with the confidence exit.
    Everything but ``decode`` is the sibling's own."""

    def __init__(self, backend: Any, head: ExitHead, threshold: float) -> None:
        if not head.full_depth:
            raise SettingsError("early_exit", f"confidence:{threshold:g}",
                                f"needs a full-depth head; this one exits after layer {head.exit_layer} of "
                                f"{head.n_layers}, which would leave the upper layers' KV cache unwritten")
        self.head, self.threshold = head, threshold
        self.counters = ExitCounters()
        self._single = False
        self._exit_logits: np.ndarray | None = None
        self._tap = Tap([FINAL_NAME], self._decide)
        self._ctx = sibling(backend, self._tap)
        self._owner = backend              # owns the weights: kept open while this context lives

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    @property
    def n_past(self) -> int:
        return self._ctx.n_past

    def _decide(self, _name: str, rows: np.ndarray) -> bool:
        if not self._single or len(rows) != 1:
            return True
        logits = self.head.logits(rows)                     # (1, V)
        if probability_margin(logits)[0] < self.threshold:
            return True
        self._exit_logits = logits[0]
        return False                                        # skip the output head

    def decode(self, tokens: Sequence[int], logits_for: LogitsFor = "last") -> np.ndarray:
        self._single = len(output_indices(len(tokens), logits_for)) == 1
        self._exit_logits = None
        rows = self._ctx.decode(tokens, logits_for)
        self._tap.check()
        if self._single:
            self.counters.steps += 1
        if self._exit_logits is None:
            return rows
        self.counters.exits += 1
        return self.head.full_row(self._exit_logits, self._ctx.n_vocab)

    def close(self) -> None:
        self._ctx.close()
        self._owner.close()                 # the weights go last
