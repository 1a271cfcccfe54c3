"""The shared draft: the full model drafts for itself with a reduced-vocabulary head, in one KV cache.

Each token is decoded once, one at a time, exactly as plain decoding does it, but the eval callback stops
llama.cpp after the final norm (``result_norm``): the blocks run and write their KV entries, the output head
(most of the cost of a small model with a large vocabulary) does not. The reduced head guesses the next token
from that state; after k such steps the model's own output head (``output_head.OutputHead``, the same ggml
kernels on the same weights) scores the k states at once. The longest agreeing prefix is kept; at the first
disagreement the full model's token is kept instead and the KV entries decoded after it are dropped.

So nothing is recomputed (the KV entries drafting wrote are the ones verification would have written), and
every kept token comes from plain decoding's logits: one row of the verifier equals llama_decode's bit for bit
(checked when the draft is set up); several rows at once are the same numbers for quantized heads, and float
heads, whose batched kernel rounds a few ulps differently, recompute near ties one row at a time. Greedy output
is identical token for token; sampling uses standard speculative acceptance (speculative.py). What it saves is the output head
done one row at a time; what it spends is the reduced head and, after a rejection, the drafted steps beyond it.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np

from edgellm.early_exit.heads import ExitHead
from edgellm.early_exit.output_head import OutputHead
from edgellm.early_exit.speculative import DEFAULT_K, DraftCounters, choose
from edgellm.early_exit.tap import FINAL_NAME, Tap
from edgellm.runtime.base import near_ties
from edgellm.runtime.generate import cache_guard
from edgellm.runtime.sampling import Sampler

logger = logging.getLogger(__name__)


class SharedDraft:
    """Owns the eval callback of ``backend``'s context (installed now: the KV cache starts empty) and the two
    heads. ``head`` is a full-depth ExitHead: its vocabulary ranking picks the reduced head's rows."""

    name = "shared"

    def __init__(self, backend, head: ExitHead) -> None:
        if not head.full_depth:
            raise ValueError("the shared draft needs a full-depth head (it exits after the final norm)")
        self.backend, self.head = backend, head
        self.full: OutputHead | None = None          # found on the first decode that computes logits
        self.reduced: OutputHead | None = None
        self._drafting = False
        self._hidden: np.ndarray | None = None         # the last decoded position's final normed state
        self.batch_exact = True          # whether several rows at once round exactly as one row does (probed)
        if backend.id != "llama.cpp-cpu":
            raise ValueError(f"the output head is computed on the CPU; this model runs on {backend.id}")
        self.tap = Tap([FINAL_NAME], self._keep, on_output=self._found_output)
        backend.install_tap(self.tap)
        try:                                  # one decode finds the output head (or says why it cannot be used)
            want = backend.decode([backend.special.bos if backend.special.bos is not None else 0], "last")[0]
            self.tap.check()
            if self.full is None:
                raise ValueError("llama.cpp's graph has no result_output node")
            if not np.array_equal(self.full.logits(self._hidden)[0], want):
                raise ValueError("the output head computed outside llama.cpp does not reproduce its logits "
                                 f"(output matrix type {self.full.type})")
            probe = np.repeat(self._hidden, 2, axis=0)
            self.batch_exact = bool(np.array_equal(self.full.logits(probe)[1], self.full.logits(probe[:1])[0]))
        except BaseException:
            backend.install_tap(None)
            raise
        finally:
            backend.truncate(0)

    def _found_output(self, node: int) -> None:
        if self.full is None:
            self.full = OutputHead.from_graph(node, self.backend.threads[0])
            if self.full.plain_layout:
                self.reduced = self.full.subset(self.head.vocab_ids)
            logger.debug("shared draft: output head %d x %d (type %d), reduced head %s", self.full.n_rows,
                         self.full.n_embd, self.full.type, "ggml rows" if self.reduced else "numpy rows")

    def _keep(self, _name: str, rows: np.ndarray) -> bool:
        self._hidden = rows[-1:]
        return not self._drafting        # drafting: stop before the output head; else llama.cpp computes logits

    def step(self, token: int) -> tuple[np.ndarray, int]:
        """Decode ``token`` through the blocks only; (its (1, n_embd) final normed state, the reduced head's
        guess of the next token)."""
        self._drafting = True
        try:
            self.backend.decode([token], "last")        # the logits row is not computed: the callback stopped
        finally:
            self._drafting = False
        self.tap.check()
        hidden = self._hidden
        if self.reduced is not None:
            guess = int(self.reduced.vocab_ids[int(np.argmax(self.reduced.logits(hidden)[0]))])
        else:
            guess = int(self.head.predict(hidden)[0][0])
        return hidden, guess

    def verify_logits(self, hidden: np.ndarray) -> np.ndarray:
        """(n, n_vocab) logits of the full model for (n, n_embd) final states, as llama_decode computes them.

        Where ggml's several-row kernel rounds differently from its one-row kernel (float heads: a few ulps,
        measured up to 2e-5), rows whose top two logits are that close are computed again one at a time, so the
        greedy token is always the one plain decoding picks."""
        rows = self.full.logits(hidden)
        if not self.batch_exact and len(rows) > 1:
            for i in near_ties(rows):
                rows[i] = self.full.logits(hidden[i:i + 1])[0]
        return rows

    def close(self) -> None:
        self.full = self.reduced = None


def shared_tokens(backend, cached: list[int], logits: np.ndarray, sampler: Sampler, history: list[int],
                  draft: SharedDraft, k: int = DEFAULT_K, counters: DraftCounters | None = None) -> Iterator[int]:
    """Yield generated tokens forever (the caller stops pulling): the contract of ``speculative_tokens``.

    A round decodes the pending token and then its guesses one at a time (``SharedDraft.step``), up to k
    steps, and verifies the k guesses against the k states in one output-head product.
    """
    counters = counters if counters is not None else DraftCounters()
    pending = sampler(logits, history)          # yielded, not yet decoded
    history.append(pending)
    yield pending
    while True:
        room = backend.n_ctx - backend.n_past - 1      # drafting leaves the last cell to a plain step
        if room <= 0:                   # as plain decoding ends: decode the pending token (or raise what it raises)
            with cache_guard(backend, cached):
                logits = backend.decode([pending], "last")[0]
            cached.append(pending)
            pending = sampler(logits, history)
            history.append(pending)
            yield pending
            continue
        states, guesses = [], []
        with cache_guard(backend, cached):
            token = pending
            for _ in range(min(k, room)):
                hidden, guess = draft.step(token)
                cached.append(token)
                states.append(hidden)
                guesses.append(guess)
                token = guess
            rows = draft.verify_logits(np.concatenate(states))       # (m, n_vocab)
        counters.rounds += 1
        counters.drafted += len(guesses)
        kept = 0
        for row, guess in zip(rows, guesses):
            ok, token = choose(row, history, sampler, guess)
            history.append(token)
            yield token
            if not ok:
                break
            kept += 1
            counters.accepted += 1
        pending = token                 # the last kept token: yielded, not decoded
        # the round decoded the old pending token and m - 1 guesses; keep it and the guesses kept among them
        keep = len(cached) - len(guesses) + 1 + min(kept, len(guesses) - 1)
        if keep < len(cached):
            with cache_guard(backend, cached):
                if not backend.truncate(keep):
                    backend.decode(cached[:keep], [])
            del cached[keep:]
