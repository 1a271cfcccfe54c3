"""Verification as plain decoding computes it on llama.cpp's CPU backend, and the shared draft built on it.

``HeadVerifier``: each token is decoded alone, exactly as plain decoding does it, but the eval callback stops
llama.cpp after the final norm (``result_norm``): the blocks run and write their KV entries, the output head
(most of the cost of a small model with a large vocabulary) does not. The model's own output head
(``output_head.OutputHead``, the same ggml kernels on the same weights) then scores all the states at once:
one row equals llama_decode's bit for bit (checked when it is set up); several rows at once are the same
numbers for quantized heads, and float heads, whose batched kernel rounds a few ulps differently, recompute
near ties one row at a time. Every draft verified this way keeps plain greedy output token for token (a
batched decode of all the guesses would not: llama.cpp's batched kernels round differently from one row).

The shared draft: the full model drafts for itself with a reduced-vocabulary head in the same KV cache. The
reduced head guesses the next token from each step's state; after k steps the output head scores the k states.
The longest agreeing prefix is kept; at the first disagreement the full model's token is kept instead and the
KV entries decoded after it are dropped. Nothing is recomputed (the KV entries drafting wrote are the ones
verification would have written); sampling uses standard speculative acceptance (speculative.py). What it
saves is the output head done one row at a time; what it spends is the reduced head and, after a rejection,
the drafted steps beyond it.
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


class HeadVerifier:
    """Verification on llama.cpp's CPU backend as one-token decode steps compute it: each token is decoded alone
    with the eval callback stopping llama.cpp after the final norm, and the model's own output head
    (``output_head.OutputHead``) scores all the states at once. Called with tokens it returns their logits
    rows (the ``verify`` a draft offers ``speculative.py``).

    Owns the eval callback of ``backend``'s context (installed now: the KV cache starts empty). Raises
    ValueError where the output head cannot be computed outside llama.cpp bit for bit (or not on the CPU)."""

    def __init__(self, backend) -> None:
        if backend.id != "llama.cpp-cpu":
            raise ValueError(f"the output head is computed on the CPU; this model runs on {backend.id}")
        self.backend = backend
        self.full: OutputHead | None = None          # found on the first decode that computes logits
        self._stepping = False
        self._hidden: np.ndarray | None = None         # the last decoded position's final normed state
        self.batch_exact = True          # whether several rows at once round exactly as one row does (probed)
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
            logger.debug("output head %d x %d (type %d)", self.full.n_rows, self.full.n_embd, self.full.type)

    def _keep(self, _name: str, rows: np.ndarray) -> bool:
        self._hidden = rows[-1:]
        return not self._stepping        # a step: stop before the output head; else llama.cpp computes logits

    def step(self, token: int) -> np.ndarray:
        """Decode ``token`` through the blocks only; its (1, n_embd) final normed state."""
        self._stepping = True
        try:
            self.backend.decode([token], "last")        # the logits row is not computed: the callback stopped
        finally:
            self._stepping = False
        self.tap.check()
        return self._hidden

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """(n, n_vocab) logits of the full model for (n, n_embd) final states, as llama_decode computes them.

        Where ggml's several-row kernel rounds differently from its one-row kernel (float heads: a few ulps,
        measured up to 2e-5), rows whose top two logits are that close are computed again one at a time, so the
        greedy token is always the one plain decoding picks."""
        rows = self.full.logits(hidden)
        if not self.batch_exact and len(rows) > 1:
            for i in near_ties(rows):
                rows[i] = self.full.logits(hidden[i:i + 1])[0]
        return rows

    def __call__(self, tokens: list[int]) -> np.ndarray:
        """Decode ``tokens`` one at a time; their (len, n_vocab) logits."""
        return self.logits(np.concatenate([self.step(t) for t in tokens]))

    def close(self) -> None:
        self.full = None


class SharedDraft:
    """The shared draft: a ``HeadVerifier`` on ``backend`` plus the reduced head, whose rows are
    ``head.vocab_ids`` (``head``: a full-depth ExitHead)."""

    name = "shared"

    def __init__(self, backend, head: ExitHead) -> None:
        if not head.full_depth:
            raise ValueError("the shared draft needs a full-depth head (it exits after the final norm)")
        self.head = head
        self.verifier = HeadVerifier(backend)
        full = self.verifier.full
        self.reduced = full.subset(head.vocab_ids) if full.plain_layout else None
        logger.debug("shared draft: reduced head %s", "ggml rows" if self.reduced else "numpy rows")

    @property
    def backend(self):
        return self.verifier.backend

    def step(self, token: int) -> tuple[np.ndarray, int]:
        """Decode ``token`` through the blocks only; (its (1, n_embd) final normed state, the reduced head's
        guess of the next token)."""
        hidden = self.verifier.step(token)
        if self.reduced is not None:
            guess = int(self.reduced.vocab_ids[int(np.argmax(self.reduced.logits(hidden)[0]))])
        else:
            guess = int(self.head.predict(hidden)[0][0])
        return hidden, guess

    def verify_logits(self, hidden: np.ndarray) -> np.ndarray:
        """``HeadVerifier.logits``: the full model's logits for (n, n_embd) final states."""
        return self.verifier.logits(hidden)

    def close(self) -> None:
        self.verifier.close()
        self.reduced = None


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
