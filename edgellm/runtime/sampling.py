"""Choosing the next token from logits, in numpy, the same for every backend.

The filters run in llama.cpp's default order: repetition penalty, top-k, top-p, min-p, then temperature
and a draw from the rest (``common/sampling.cpp``). Temperature 0 is greedy: the penalised argmax.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from edgellm.errors import SettingsError

REPEAT_LAST_N = 64          # tokens the repetition penalty looks back over (llama.cpp's default)
NUCLEUS_SHORTLIST = 256     # top-p first looks at this many best tokens; a full sort only if they fall short


@dataclass(frozen=True)
class GenerationSettings:
    """How to generate: length, sampling filters, seed and stop strings.

    temperature 0 means greedy; top_k 0, top_p 1, min_p 0 and repeat_penalty 1 switch that filter off.
    ``seed`` None draws a fresh seed; the same seed with the same prompt gives the same text.
    Generation stops at ``max_tokens``, at an end-of-generation token, or when a ``stop`` string appears
    (the stop string itself is not returned).
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):               # a single stop string is a common slip
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        for name, ok, problem in _CHECKS:
            value = getattr(self, name)
            if not ok(value):
                raise SettingsError(name, repr(value), problem)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and np.isfinite(v)


# (field, check, what is wrong when the check fails)
_CHECKS = (
    ("max_tokens", lambda v: _is_int(v) and v >= 1, "must be an integer >= 1"),
    ("temperature", lambda v: _is_number(v) and v >= 0, "must be a number >= 0 (0 = greedy)"),
    ("top_k", lambda v: _is_int(v) and v >= 0, "must be an integer >= 0 (0 = off)"),
    ("top_p", lambda v: _is_number(v) and 0 < v <= 1, "must be in (0, 1] (1 = off)"),
    ("min_p", lambda v: _is_number(v) and 0 <= v < 1, "must be in [0, 1) (0 = off)"),
    ("repeat_penalty", lambda v: _is_number(v) and v > 0, "must be a number > 0 (1 = off)"),
    ("seed", lambda v: v is None or (_is_int(v) and v >= 0), "must be None or an integer >= 0"),
    ("stop", lambda v: all(isinstance(s, str) and s for s in v), "must be non-empty strings"),
)


def with_overrides(settings: GenerationSettings | None, overrides: dict[str, Any]) -> GenerationSettings:
    """``settings`` (default GenerationSettings()) with keyword overrides applied and checked."""
    base = settings or GenerationSettings()
    known = {f.name for f in dataclasses.fields(GenerationSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SettingsError(unknown[0], repr(overrides[unknown[0]]),
                            f"unknown setting; known: {', '.join(sorted(known))}")
    return dataclasses.replace(base, **overrides) if overrides else base


def apply_repeat_penalty(logits: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """llama.cpp's penalty on the last REPEAT_LAST_N tokens: positive logits divided, negative multiplied."""
    if penalty == 1.0 or not history:
        return logits
    ids = np.unique(np.asarray(history[-REPEAT_LAST_N:], dtype=np.int64))
    out = logits.copy()
    seen = out[ids]
    out[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return out


def candidates(logits: np.ndarray, settings: GenerationSettings) -> tuple[np.ndarray, np.ndarray]:
    """The token ids that survive top-k, top-p and min-p, and their logits (in no particular order).

    logits: (n_vocab,) float32, already penalised. Returns (ids, logits), both (n_kept,).
    """
    ids = np.arange(logits.size)
    if 0 < settings.top_k < logits.size:
        ids = np.argpartition(-logits, settings.top_k - 1)[:settings.top_k]
    if settings.top_p < 1.0:
        ids = _nucleus(logits, ids, settings.top_p)
    kept = logits[ids]
    if settings.min_p > 0.0:
        # p_i >= min_p * p_max  <=>  logit_i - logit_max >= log(min_p)
        keep = kept >= kept.max() + np.log(settings.min_p)
        ids, kept = ids[keep], kept[keep]
    return ids, kept


def _nucleus(logits: np.ndarray, pool: np.ndarray, top_p: float) -> np.ndarray:
    """The smallest set of the most likely ``pool`` ids whose probability (within the pool) reaches top_p."""
    pool_logits = logits[pool]
    weights = np.exp(pool_logits - pool_logits.max())
    total = weights.sum()
    # Sorting 262k logits per token is slow: sort a shortlist of the best, which is exact whenever its
    # mass already reaches top_p; sort everything only when it does not.
    n = min(NUCLEUS_SHORTLIST, pool.size)
    order = np.argpartition(-pool_logits, n - 1)[:n] if n < pool.size else np.arange(pool.size)
    order = order[np.argsort(-pool_logits[order], kind="stable")]
    mass = np.cumsum(weights[order]) / total
    if mass[-1] < top_p and n < pool.size:
        order = np.argsort(-pool_logits, kind="stable")
        mass = np.cumsum(weights[order]) / total
    n_keep = min(int(np.searchsorted(mass, top_p)) + 1, order.size)
    return pool[order[:n_keep]]


class Sampler:
    """Picks tokens for one generation; holds its random generator so a seed reproduces a run."""

    def __init__(self, settings: GenerationSettings) -> None:
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int]) -> int:
        """The next token id. logits: (n_vocab,) float32; history: prompt and generated ids so far."""
        logits = apply_repeat_penalty(logits, history, self.settings.repeat_penalty)
        if self.settings.greedy:
            return int(np.argmax(logits))
        ids, kept = candidates(logits, self.settings)
        scaled = kept.astype(np.float64) / self.settings.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        return int(ids[self.rng.choice(ids.size, p=probs)])
