"""The decoder graph cut for early exit (``edgellm.converters.onnx.split``), run as stages on one weights file.

Three stages: the lower part (embeddings, layers < E), the middle (layers E..L-1; none when E == L) and the
head (final norm and output projection). The lower stage may run ahead of the others (drafting): its states
wait in ``ahead`` until a decode or a verification uses them, or ``fill`` commits them (CALM).

Two ways through the upper stages:

* ``decode``: every stage over all rows at once, in prompt batches. Bitwise what the whole graph computes
  (prompt prefill, plain decoding on a split backend).
* ``verify``: what one-token decode steps compute. ONNX Runtime's attention rounds a batch of rows differently
  from one row (its CPU GroupQueryAttention multiplies probabilities by V with a one-row kernel of its own), so
  the blocks run one row at a time, as plain decoding runs them, and only the output head, whose rows are
  independent, runs once over all rows. MatMulNBits at accuracy level 4 with block 32 gives each row bit for
  bit what one row gives (block 128, the int8 head's, does not: measured); a head that rounds a batch
  differently (probed on the first verification) has its near ties computed again one row at a time, so a
  verified greedy token is always the one plain decoding picks.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import numpy as np

from edgellm.runtime.base import near_ties
from edgellm.runtime.onnx_stages import LOGITS_TO_KEEP, Stage, batches, kept_rows

MakeStage = Callable[[bytes, Sequence[int], str], Stage]      # (serialized part, its layers, name) -> Stage
PROBE_ROWS = 4                      # rows of the head's batch-exactness probe
IO_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class SplitRun:
    """The stages of a graph cut before layer ``parts.exit_layer`` (a ``split.Parts``)."""

    def __init__(self, make_stage: MakeStage, parts: Any, fill_graph: bytes | None, *, n_layers: int,
                 input_ids: str, logits: str, n_batch: int, where: str) -> None:
        from edgellm.converters.onnx.split import boundary

        e = self.exit_layer = parts.exit_layer
        self._exit, self._final = boundary(e), boundary(n_layers)
        self._input_ids, self._logits, self._n_batch, self._where = input_ids, logits, n_batch, where
        self._make = make_stage
        self.lower = make_stage(parts.lower.SerializeToString(), range(e), "lower")
        self.middle = make_stage(parts.middle.SerializeToString(), range(e, n_layers), "middle") \
            if parts.middle is not None else None
        self.head = make_stage(parts.head.SerializeToString(), [], "head")
        self._fill_graph, self._filler = fill_graph, None
        self.ahead: list[tuple[int, np.ndarray, np.ndarray]] = []   # (token, hidden, residual) run ahead

    @property
    def stages(self) -> list[Stage]:
        return [s for s in (self.lower, self.middle, self.head, self._filler) if s is not None]

    @property
    def n_past(self) -> int:
        return self.head.n_past

    # --- the lower part ---

    def run_lower(self, tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The lower part over ``tokens`` after what already ran, in prompt batches: the exit boundary's
        (hidden, residual), each (len, hidden_size)."""
        parts = []
        for start in range(0, len(tokens), self._n_batch):
            chunk = np.array([tokens[start:start + self._n_batch]], np.int64)
            out = self.lower.run({self._input_ids: chunk}, chunk.shape[1], self._where)
            parts.append((out[self._exit[0]][0], out[self._exit[1]][0]))
        if not parts:
            return self._empty(), self._empty()
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def run_ahead(self, tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``run_lower``, keeping the states for the next decode or verification."""
        hidden, residual = self.run_lower(tokens)
        self.ahead.extend(zip(tokens, hidden, residual))
        return hidden, residual

    def _reuse(self, tokens: Sequence[int]) -> int:
        """How many leading ``tokens`` the states run ahead already hold; the rest of them are dropped."""
        n = 0
        while n < min(len(tokens), len(self.ahead)) and self.ahead[n][0] == tokens[n]:
            n += 1
        del self.ahead[n:]
        self.lower.truncate(self.n_past + n)
        return n

    def _take_ahead(self) -> tuple[np.ndarray, np.ndarray]:
        rows = self.ahead
        self.ahead = []
        if not rows:
            return self._empty(), self._empty()
        return np.stack([a[1] for a in rows]), np.stack([a[2] for a in rows])

    def _empty(self) -> np.ndarray:
        return np.empty((0, 0), np.float32)

    # --- the upper stages ---

    def decode(self, tokens: Sequence[int], wanted: Sequence[int]) -> list[np.ndarray]:
        """Every stage over all rows at once (see the module docstring); the wanted logits rows, one
        (len, n_vocab) array per prompt batch that has some."""
        self.run_ahead(tokens[self._reuse(tokens):])
        hidden, residual = self._take_ahead()
        rows = []
        for start, n, outputs, keep in batches(len(tokens), self._n_batch, wanted):
            h, r = self._middle(hidden[start:start + n], residual[start:start + n])
            logits = self._head(h, r, keep)                        # the last ``keep`` of the n rows
            if outputs:
                rows.append(kept_rows(logits, n, outputs))
        return rows

    def verify(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits (len(tokens), n_vocab) as one-token steps compute them (see the module docstring)."""
        for token in tokens[self._reuse(tokens):]:
            self.run_ahead([token])
        hidden, residual = self._take_ahead()
        if self.middle is not None:
            steps = [self._middle(hidden[i:i + 1], residual[i:i + 1]) for i in range(len(tokens))]
            hidden, residual = np.concatenate([s[0] for s in steps]), np.concatenate([s[1] for s in steps])
        rows = self._head(hidden, residual, len(tokens))
        if len(rows) > 1 and not self.head_exact:
            for i in near_ties(rows):
                rows[i] = self._head(hidden[i:i + 1], residual[i:i + 1], 1, count=False)[0]
        return rows

    def _middle(self, hidden: np.ndarray, residual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The middle stage over (n, hidden) exit states: the final boundary's (hidden, residual)."""
        if self.middle is None:
            return hidden, residual
        out = self.middle.run({self._exit[0]: hidden[None], self._exit[1]: residual[None]}, len(hidden),
                              self._where)
        return out[self._final[0]][0], out[self._final[1]][0]

    def _head(self, hidden: np.ndarray, residual: np.ndarray, keep: int, *, count: bool = True) -> np.ndarray:
        """Logits (keep, n_vocab) float32 of the last ``keep`` rows; ``count``: the rows are new positions."""
        n_past = self.head.n_past
        out = self.head.run({self._final[0]: hidden[None], self._final[1]: residual[None],
                             LOGITS_TO_KEEP: np.array(keep, np.int64)}, len(hidden), self._where)
        if not count:
            self.head.n_past = n_past
        return out[self._logits][0][-keep:].astype(np.float32, copy=False)

    @functools.cached_property
    def head_exact(self) -> bool:
        """Whether the head gives a batch of rows bit for bit what it gives each row alone (probed on first
        use: only verification needs it)."""
        state = next(i for i in self.head.session.get_inputs() if i.name == self._final[0])
        dtype, width = IO_TYPES.get(state.type, np.float32), state.shape[-1]
        rng = np.random.default_rng(0)
        hidden = rng.standard_normal((PROBE_ROWS, width)).astype(dtype)
        residual = np.zeros_like(hidden)
        batch = self._head(hidden, residual, PROBE_ROWS, count=False)
        return all(np.array_equal(batch[i], self._head(hidden[i:i + 1], residual[i:i + 1], 1, count=False)[0])
                   for i in range(PROBE_ROWS))

    # --- CALM, positions ---

    def fill(self) -> None:
        """Commit the states run ahead without the upper stages: the fill graph writes the middle layers' K/V
        from the exit state. Positions advance as if the upper stages had run them."""
        if not self.ahead:
            return
        n = len(self.ahead)
        if self._fill_graph is not None:
            if self._filler is None:              # bound to the middle stage's buffers: it writes that cache
                self._filler = self._make(self._fill_graph, self.middle.layers, "fill", self.middle.kv)
            self._filler.n_past = self.n_past
            hidden, residual = self._take_ahead()
            self._filler.run({self._exit[0]: hidden[None], self._exit[1]: residual[None]}, n, self._where)
        self.ahead = []
        for stage in (self.middle, self.head):
            if stage is not None:
                stage.n_past += n

    def truncate(self, n_past: int) -> None:
        """Drop positions >= ``n_past`` (states run ahead included)."""
        del self.ahead[max(n_past - self.n_past, 0):]
        committed = self.n_past
        self.lower.truncate(min(n_past, committed + len(self.ahead)))
        for stage in (self.middle, self.head):
            if stage is not None:
                stage.truncate(n_past)

    def close(self) -> None:
        for stage in self.stages:
            stage.close()
        self.ahead = []
