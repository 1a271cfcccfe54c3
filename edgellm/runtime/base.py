"""The backend protocol: what a runtime engine (llama.cpp, ONNX Runtime) must offer the generation code.

A backend owns one model and one sequence of KV cache. ``decode`` appends tokens at the current position
(``n_past``) and returns logits only for the positions asked for, so a draft-and-verify loop can check k
draft tokens with one call; ``truncate`` drops the cache past a position (to reuse a shared prompt prefix
or reject draft tokens). Everything above this file (sampling, streaming, chat, threads) is written
against this protocol and never asks which engine it drives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Protocol, Sequence, Union, runtime_checkable

import numpy as np

DEFAULT_N_CTX = 4096    # context in tokens when neither caller nor bundle sets one (capped at the training length)
# relative top-2 gap under which a logits row computed in a batch is computed again alone, where the engine's
# batched kernel rounds differently from its one-row kernel (a few ulps: measured up to 2e-5 relative)
TIE_BOUND = 1e-4

# Which positions of a decode call get logits: the last one, all of them, or these indices into the call.
LogitsFor = Union[Literal["last", "all"], Sequence[int]]


@dataclass(frozen=True)
class SpecialTokens:
    bos: int | None               # beginning of sequence
    eos: int | None               # end of sequence
    eot: int | None               # end of turn (Gemma <end_of_turn>, Llama 3 <|eot_id|>); None if the vocab has none
    add_bos: bool                 # the tokenizer prepends BOS when asked to add special tokens
    bos_text: str = ""            # their text, for chat templates ({{ bos_token }})
    eos_text: str = ""


def output_indices(n_tokens: int, logits_for: LogitsFor) -> list[int]:
    """Sorted, de-duplicated indices into a decode call of ``n_tokens`` that need logits.

    Raises:
        ValueError: an index outside ``[0, n_tokens)``.
    """
    if isinstance(logits_for, str):
        if logits_for == "last":
            return [n_tokens - 1] if n_tokens else []
        if logits_for == "all":
            return list(range(n_tokens))
        raise ValueError(f"logits_for must be 'last', 'all' or a list of indices, not {logits_for!r}")
    wanted = sorted(set(int(i) for i in logits_for))
    if wanted and (wanted[0] < 0 or wanted[-1] >= n_tokens):
        raise ValueError(f"logits_for indices {wanted} fall outside the {n_tokens} tokens decoded")
    return wanted


def near_ties(rows: np.ndarray, bound: float = TIE_BOUND) -> np.ndarray:
    """Indices of the (n, n_vocab) ``rows`` whose top two logits are within ``bound`` (relative) of each other:
    the rows whose greedy token a few ulps of rounding could change."""
    if rows.shape[0] == 0 or rows.shape[1] < 2:
        return np.empty(0, np.int64)
    top2 = np.partition(rows, -2, axis=1)[:, -2:]
    return np.flatnonzero(top2[:, 1] - top2[:, 0] <= bound * (np.abs(top2[:, 1]) + 1.0))


def default_n_ctx(n_ctx_train: int) -> int:
    """The context to create when none was asked for: DEFAULT_N_CTX, or less if the model was trained shorter."""
    return min(DEFAULT_N_CTX, n_ctx_train) if n_ctx_train > 0 else DEFAULT_N_CTX


@runtime_checkable
class Backend(Protocol):
    """One loaded model plus one KV-cache sequence."""

    id: str                       # row of edgellm.backends.BACKENDS, e.g. "llama.cpp-cpu"
    n_ctx: int                    # KV-cache capacity in tokens
    n_ctx_train: int              # context length the model was trained with
    n_vocab: int
    special: SpecialTokens
    chat_template: str | None     # the template the model file carries, if any
    metadata: Mapping[str, str]   # model metadata as strings (GGUF key/values, ONNX genai config)

    @property
    def n_past(self) -> int:
        """Tokens now in the KV cache (the position the next decoded token gets)."""

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds BOS/EOS as the model asks, ``parse_special`` turns
        special-token text such as ``<start_of_turn>`` into its id."""

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token as it appears in generated text (special tokens: empty).
        May be part of a UTF-8 character: streaming joins bytes before decoding."""

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens`` (a leading BOS is dropped)."""

    def is_end(self, token: int) -> bool:
        """True for tokens that end generation (EOS, end of turn and the like)."""

    def decode(self, tokens: Sequence[int], logits_for: LogitsFor = "last") -> np.ndarray:
        """Append ``tokens`` to the KV cache at ``n_past``; return float32 logits of shape
        (len(output_indices), n_vocab) for the requested positions, in order.

        Raises ContextOverflowError when the tokens do not fit, DecodeError when the engine fails."""

    def truncate(self, n_past: int) -> bool:
        """Drop KV entries at positions >= ``n_past``. Returns False if the engine could not keep the
        prefix (the cache is then empty and ``n_past`` is 0)."""

    def set_threads(self, n_decode: int, n_batch: int) -> None:
        """Threads for one-token decode steps and for multi-token batches."""

    def close(self) -> None:
        """Free native resources; idempotent."""
