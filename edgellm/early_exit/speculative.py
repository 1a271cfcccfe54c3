"""Draft and verify on any Backend: the draft proposes k tokens, the full model scores them (the draft's own
``verify`` where it has one, else one ``decode(..., "all")`` call), the longest agreeing prefix and the full
model's own next token are kept, and the rejected tail is cut from the KV cache with ``truncate``.

Greedy: each kept token is the full model's argmax, so the output equals plain greedy decoding: bit for bit
where the draft's ``verify`` computes rows as one-token steps do; with a batched decode, up to the engine's
batched kernels rounding a near tie the other way. Sampling:
standard speculative acceptance (Leviathan et al. 2023, Chen et al. 2023): accept a draft token d with
probability min(1, p(d)/q(d)), otherwise draw from norm(max(p - q, 0)); a deterministic draft has q one-hot.
The kept tokens are then distributed exactly as the full model's samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from edgellm.runtime.base import Backend
from edgellm.runtime.generate import cache_guard
from edgellm.runtime.sampling import Sampler, apply_repeat_penalty, candidates

if TYPE_CHECKING:                       # draft.py imports the runtime, which imports this file
    from edgellm.early_exit.draft import Draft

logger = logging.getLogger(__name__)

DEFAULT_K = 4           # draft tokens per verification


@dataclass
class DraftCounters:
    """Running totals for one generation."""

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def target_probs(logits: np.ndarray, history: Sequence[int], sampler: Sampler) -> np.ndarray:
    """The full model's sampling distribution as a dense (n_vocab,) float64 vector (after every filter)."""
    settings = sampler.settings
    ids, kept = candidates(apply_repeat_penalty(logits, history, settings.repeat_penalty), settings)
    scaled = kept.astype(np.float64) / settings.temperature
    probs = np.zeros(logits.size)
    probs[ids] = np.exp(scaled - scaled.max())
    return probs / probs.sum()


def accept_or_resample(p: np.ndarray, q: np.ndarray, token: int, rng: np.random.Generator) -> tuple[bool, int]:
    """Speculative acceptance of draft ``token`` drawn from ``q`` against target ``p`` (dense, same length).

    Returns (accepted, the token to keep): ``token`` itself, or a draw from norm(max(p - q, 0)).
    """
    if q[token] > 0 and rng.random() < min(1.0, p[token] / q[token]):
        return True, token
    residual = np.maximum(p - q, 0.0)
    total = residual.sum()
    residual = residual / total if total > 0 else p     # p == q: any rejection is impossible in exact math
    return False, int(rng.choice(p.size, p=residual))


def choose(row: np.ndarray, history: list[int], sampler: Sampler, proposed: int | None) -> tuple[bool, int]:
    """(whether ``proposed`` stands, the token to keep) at one verified position."""
    if sampler.settings.greedy:
        token = sampler(row, history)
        return token == proposed, token
    p = target_probs(row, history, sampler)
    if proposed is None:
        return False, int(sampler.rng.choice(p.size, p=p))
    q = np.zeros_like(p)
    q[proposed] = 1.0                       # our drafts are deterministic (argmax or n-gram copy)
    return accept_or_resample(p, q, proposed, sampler.rng)


def speculative_tokens(backend: Backend, cached: list[int], logits: np.ndarray, sampler: Sampler,
                       history: list[int], draft: "Draft", k: int = DEFAULT_K,
                       counters: DraftCounters | None = None) -> Iterator[int]:
    """Yield generated tokens forever (the caller stops pulling), drafting and verifying as it goes.

    ``logits`` (n_vocab,) are the full model's for the token after ``cached``; ``cached`` (the KV cache's
    tokens) and ``history`` (prompt and generated tokens) are kept up to date, also when the caller stops
    in the middle of a round.
    """
    counters = counters if counters is not None else DraftCounters()
    verify = getattr(draft, "verify", None) or (lambda tokens: backend.decode(tokens, "all"))
    token = sampler(logits, history)
    while True:
        history.append(token)
        yield token
        room = backend.n_ctx - backend.n_past - 1       # verification decodes the pending token and the drafts
        proposal = draft.propose(history, min(k, room))[:max(room, 0)] if room > 0 else []
        with cache_guard(backend, cached):
            rows = verify([token] + proposal)                      # (1 + len(proposal), n_vocab)
        cached.extend([token] + proposal)
        counters.rounds += 1
        counters.drafted += len(proposal)
        token = None
        for i, proposed in enumerate(proposal + [None]):
            ok, token = choose(rows[i], history, sampler, proposed)
            if not ok:
                break
            counters.accepted += 1
            history.append(token)
            yield token
        if len(proposal) - i:
            _drop_tail(backend, cached, len(cached) - (len(proposal) - i))


def _drop_tail(backend: Backend, cached: list[int], keep: int) -> None:
    """Cut the KV cache (and ``cached``) back to ``keep`` tokens; re-decode them if the engine cannot cut
    (a sliding-window cache that already dropped positions the kept prefix needs)."""
    with cache_guard(backend, cached):
        if not backend.truncate(keep):
            logger.debug("the cache could not drop %d rejected tokens: re-decoding %d", len(cached) - keep, keep)
            backend.decode(cached[:keep], [])
    del cached[keep:]
