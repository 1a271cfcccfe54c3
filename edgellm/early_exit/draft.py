"""Draft sources: cheap guesses of the next k tokens, checked afterwards by the full model.

Every source implements ``Draft``: ``propose(context, k)`` returns up to k token ids that may follow
``context`` (all tokens so far, including the one just sampled). Returning fewer (even none) is allowed.
A source may also offer ``verify(tokens)``: the full model's logits for ``tokens`` appended to the cache,
computed as one-token decode steps compute them (``speculative.py`` uses it instead of a batched decode).
"""

from __future__ import annotations

import logging
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from edgellm.early_exit.heads import ExitHead
from edgellm.runtime.generate import common_prefix

logger = logging.getLogger(__name__)

MAX_NGRAM = 3           # longest context suffix prompt lookup tries to match
MIN_NGRAM = 1


@runtime_checkable
class Draft(Protocol):
    name: str

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` token ids guessed to follow ``context``."""

    def close(self) -> None:
        """Free what the draft holds; idempotent."""


class PromptLookup:
    """n-gram drafting: find the latest earlier occurrence of the context's last n tokens (n = MAX_NGRAM down
    to MIN_NGRAM) and propose what followed it. Free to compute; useful when the output copies the input."""

    name = "prompt-lookup"

    def __init__(self, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        ctx = np.asarray(context, np.int64)
        for n in range(min(self.max_ngram, len(ctx) - 1), self.min_ngram - 1, -1):
            tail = ctx[-n:]
            windows = np.lib.stride_tricks.sliding_window_view(ctx[:-1], n)   # (len-n, n): earlier n-grams
            hits = np.flatnonzero((windows == tail).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return [int(t) for t in ctx[start:start + k]]
        return []

    def close(self) -> None:
        pass


class SelfDraft:
    """The model drafting for itself: a second llama.cpp context on the same weights that runs only the first
    ``head.exit_layer`` blocks (the eval callback stops the graph there, skipping the output head), then the
    fitted exit head and the reduced-vocabulary head in numpy. Its KV cache is its own and kept in sync with
    the context passed to ``propose`` (shared prefix kept, the rest decoded).
    """

    name = "self"

    def __init__(self, backend, head: ExitHead, *, min_margin: float = 0.0) -> None:
        from edgellm.early_exit.tap import Tap, layer_output_name, sibling

        self.head, self.min_margin = head, min_margin
        self._hidden: np.ndarray | None = None
        self.tap = Tap([layer_output_name(head.exit_layer, head.n_layers)], self._keep)
        self.ctx = sibling(backend, self.tap)
        self._cached: list[int] = []

    def _keep(self, _name: str, rows: np.ndarray) -> bool:
        self._hidden = rows[-1:]          # (1, n_embd): the last position's state
        return False                      # stop: the rest of the graph is what drafting saves

    def _step(self, tokens: Sequence[int]) -> tuple[int, float]:
        """Decode ``tokens`` up to the exit; (drafted next token, its probability margin)."""
        self.ctx.decode(list(tokens), "last")
        self._cached.extend(tokens)
        self.tap.check()
        ids, margin = self.head.predict(self._hidden)
        return int(ids[0]), float(margin[0])

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        keep = min(common_prefix(self._cached, context), len(context) - 1)
        if not self.ctx.truncate(keep):
            keep = 0
        del self._cached[keep:]
        token, margin = self._step(context[keep:])
        out = [token]
        while len(out) < k and margin >= self.min_margin and self.ctx.n_past < self.ctx.n_ctx:
            token, margin = self._step([token])
            out.append(token)
        return out

    def close(self) -> None:
        self.ctx.close()


class Verified:
    """``draft``'s guesses checked by ``verifier`` (tokens -> their logits rows as one-token decode steps
    compute them, e.g. ``shared.HeadVerifier``) instead of one batched decode. Closing closes both."""

    def __init__(self, draft: Draft, verifier) -> None:
        self.draft, self.verifier, self.name = draft, verifier, draft.name

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        return self.draft.propose(context, k)

    def verify(self, tokens: Sequence[int]) -> np.ndarray:
        return self.verifier(list(tokens))

    def close(self) -> None:
        self.draft.close()
        self.verifier.close()
