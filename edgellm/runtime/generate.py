"""The generation loop: prefill with prefix reuse, sample, decode one token at a time, stream text.

Text is streamed safely: bytes of a token that end inside a UTF-8 character wait for the next token, and
text that could be the start of a stop string waits until it is clear it is not one. The stream ends with
one chunk that carries the finish reason and the statistics.
"""

from __future__ import annotations

import codecs
import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from edgellm.errors import ContextOverflowError, SettingsError
from edgellm.runtime.base import Backend
from edgellm.runtime.sampling import GenerationSettings, Sampler

FINISH_STOP = "stop"        # an end-of-generation token or a stop string
FINISH_LENGTH = "length"    # max_tokens reached, or the context is full


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    reused_prompt_tokens: int       # prompt tokens whose KV entries were kept from the previous call
    ttft_seconds: float             # call start to first sampled token (prefill included)
    prefill_tokens_per_s: float     # prompt tokens actually evaluated / prefill time
    decode_tokens_per_s: float      # one-token decode steps (with sampling and detokenizing) per second
    total_seconds: float = 0.0
    dropped_messages: int = 0       # chat messages left out to fit the context (on_overflow="drop_oldest")
    drafted_tokens: int = 0         # early exit: draft tokens proposed for verification
    accepted_tokens: int = 0        # early exit: draft tokens the full model agreed with

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0


@dataclass(frozen=True)
class Chunk:
    """One step of a stream. ``text`` may be empty (held back); ``token`` is None on the final chunk,
    which alone has ``finish_reason`` ("stop" or "length") and ``stats``."""

    text: str
    token: int | None
    finish_reason: str | None = None
    stats: GenerationStats | None = None


@dataclass(frozen=True)
class Completion:
    """A finished generation. ``tokens`` are the generated ids (an end-of-generation token excluded)."""

    text: str
    tokens: list[int]
    finish_reason: str
    stats: GenerationStats

    @property
    def dropped_messages(self) -> int:
        return self.stats.dropped_messages


class StopMatcher:
    """Cuts streamed text at the first stop string; holds back text that may be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add ``text``; return (text safe to emit, whether a stop string was reached)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            emit, self.pending = self.pending[:min(hits)], ""
            return emit, True
        hold = self._held_length()
        emit = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return emit, False

    def _held_length(self) -> int:
        """Length of the longest end of ``pending`` that is a proper prefix of a stop string."""
        longest = max((len(s) for s in self.stops), default=1) - 1
        for n in range(min(longest, len(self.pending)), 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        emit, self.pending = self.pending, ""
        return emit


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading ids ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def prefill(backend: Backend, cached: list[int], prompt: Sequence[int]) -> tuple[np.ndarray, int]:
    """Bring the KV cache from ``cached`` (updated in place) to ``prompt``, reusing their shared prefix.

    Returns (logits of the last prompt token (n_vocab,), number of prompt tokens reused).
    """
    # The last prompt token is always decoded again: its logits are what the first sample needs.
    reused = min(common_prefix(cached, prompt), len(prompt) - 1)
    if not backend.truncate(reused):
        reused = 0
    del cached[reused:]
    with cache_guard(backend, cached):
        logits = backend.decode(prompt[reused:], "last")
    cached.extend(prompt[reused:])
    return logits[0], reused


@contextlib.contextmanager
def cache_guard(backend: Backend, cached: list[int]) -> Iterator[None]:
    """On any failure inside, empty the KV cache so ``cached`` and the backend cannot disagree."""
    try:
        yield
    except BaseException:
        backend.truncate(0)
        cached.clear()
        raise


def check_prompt(prompt: Sequence[int], n_ctx: int) -> None:
    """Raise SettingsError for an empty prompt, ContextOverflowError for one longer than ``n_ctx``."""
    if not prompt:
        raise SettingsError("prompt", "''", "has no tokens")
    if len(prompt) > n_ctx:
        raise ContextOverflowError(len(prompt), n_ctx, "the prompt")


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 and count else 0.0


# (backend, cached, logits after cached, sampler, history) -> generated ids, one per pull; the source
# decodes as it goes, keeps ``cached`` equal to the KV cache and appends each token to ``history``.
TokenSource = Callable[[Backend, list, np.ndarray, Sampler, list], Iterator[int]]


def plain_tokens(backend: Backend, cached: list[int], logits: np.ndarray, sampler: Sampler,
                 history: list[int]) -> Iterator[int]:
    """One decode step per token: sample, yield, and decode it only when the next one is asked for."""
    while True:
        token = sampler(logits, history)
        history.append(token)
        yield token
        with cache_guard(backend, cached):
            logits = backend.decode([token], "last")[0]
        cached.append(token)


def run(backend: Backend, cached: list[int], prompt: Sequence[int], settings: GenerationSettings, *,
        clock: Callable[[], float] = time.perf_counter, source: TokenSource = plain_tokens,
        counters: object | None = None) -> Iterator[Chunk]:
    """Generate from ``prompt`` (token ids), yielding one Chunk per generated token and a final one.

    ``cached`` lists the tokens in the backend's KV cache and is kept up to date. ``source`` makes the
    tokens (early exit passes a draft-and-verify loop); ``counters`` (with ``drafted``/``accepted``) feed the stats.
    Raises ContextOverflowError when the prompt is longer than the context.
    """
    check_prompt(prompt, backend.n_ctx)
    t_start = clock()
    logits, reused = prefill(backend, cached, prompt)
    t_prefilled = clock()
    tokens = source(backend, cached, logits, Sampler(settings), list(prompt))
    utf8 = codecs.getincrementaldecoder("utf-8")("replace")
    stops = StopMatcher(settings.stop)
    generated: list[int] = []
    ttft = None
    finish, stopped, steps = FINISH_LENGTH, False, -1
    paused = 0.0                    # time spent in the consumer between chunks: not ours to count
    for token in tokens:
        steps += 1                  # tokens after the first each cost (part of) a decode
        ttft = clock() - t_start if ttft is None else ttft
        if backend.is_end(token):
            finish = FINISH_STOP
            break
        generated.append(token)
        text, stopped = stops.push(utf8.decode(backend.token_bytes(token)))
        t_yield = clock()
        yield Chunk(text, token)
        paused += clock() - t_yield
        if stopped:
            finish = FINISH_STOP
            break
        if len(generated) >= settings.max_tokens or backend.n_past >= backend.n_ctx:
            break
    tokens.close()
    t_end = clock() - paused
    tail, stopped_late = ("", False) if stopped else _drain(utf8, stops)
    finish = FINISH_STOP if stopped_late else finish
    stats = GenerationStats(
        prompt_tokens=len(prompt), generated_tokens=len(generated), reused_prompt_tokens=reused,
        ttft_seconds=ttft or 0.0, prefill_tokens_per_s=_rate(len(prompt) - reused, t_prefilled - t_start),
        decode_tokens_per_s=_rate(steps, t_end - t_start - (ttft or 0.0)), total_seconds=t_end - t_start,
        drafted_tokens=getattr(counters, "drafted", 0), accepted_tokens=getattr(counters, "accepted", 0))
    yield Chunk(tail, None, finish, stats)


def _drain(utf8: codecs.IncrementalDecoder, stops: StopMatcher) -> tuple[str, bool]:
    """Text still held at the end (an incomplete UTF-8 tail as U+FFFD, a partial stop match), and
    whether that tail completed a stop string."""
    text, stopped = stops.push(utf8.decode(b"", final=True))
    return (text, True) if stopped else (text + stops.flush(), False)


def collect(chunks: Iterator[Chunk]) -> Completion:
    """Join a stream into a Completion."""
    parts, tokens = [], []
    for chunk in chunks:
        parts.append(chunk.text)
        if chunk.token is not None:
            tokens.append(chunk.token)
        if chunk.finish_reason is not None:
            return Completion("".join(parts), tokens, chunk.finish_reason, chunk.stats)
    raise RuntimeError("the stream ended without a final chunk")
