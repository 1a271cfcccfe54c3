"""``Runtime``: load a bundle or a model file and generate, stream, chat or score with it.

The runtime drives one backend (see ``base.Backend``) and remembers which tokens sit in its KV cache, so
a call whose prompt starts like the previous one (the next turn of a chat) evaluates only the new part.
One call at a time: a server must serialise requests. A new call invalidates a stream still open.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import psutil

from edgellm import bundle as bundles
from edgellm.early_exit import attach as early_exits
from edgellm.early_exit.speculative import DraftCounters
from edgellm.errors import ModelLoadError, NoChatTemplateError, SettingsError
from edgellm.runtime import chat as chats
from edgellm.runtime import threads as thread_tuning
from edgellm.runtime.base import Backend, output_indices
from edgellm.runtime.generate import (Chunk, Completion, cache_guard, check_prompt, collect, common_prefix,
                                      plain_tokens, run)
from edgellm.runtime.sampling import GenerationSettings, with_overrides

logger = logging.getLogger(__name__)

DEFAULT_KV_TYPE = "f16"


@dataclass(frozen=True)
class RuntimeInfo:
    model_path: str
    backend: str                    # id in edgellm.backends.BACKENDS
    model_name: str
    file_size_bytes: int
    n_ctx: int
    n_ctx_train: int
    n_vocab: int
    n_batch: int
    kv_type: str
    n_threads: int
    n_threads_batch: int
    threads_source: str             # "tuned", "cached", "override" or "manifest"
    threads_tuning_seconds: float   # time spent timing thread counts (0 unless threads_source is "tuned")
    load_seconds: float             # path to ready model and context, thread tuning excluded
    rss_after_load_bytes: int       # resident memory of the process right after loading
    mmap: bool
    mlock: bool                     # the weights are actually locked in RAM
    mlock_note: str | None          # why an mlock request did not take effect
    bundle_dir: str | None
    chat_template_source: str | None   # "argument", "bundle", "model" or None (no template)
    provider: str | None = None        # ONNX Runtime execution provider in use ("CPUExecutionProvider"); None for GGUF
    provider_reason: str | None = None  # why that provider (requested, exported for, the probe's choice)
    provider_note: str | None = None   # the fallback, when the wanted provider could not be used
    early_exit: str = "off"            # "off", "lossless" or "confidence:T" (edgellm.early_exit)
    early_exit_note: str | None = None  # the draft source in use, or why a fallback was taken


def _read_template(chat_template: str | os.PathLike | None, resolved: bundles.ResolvedModel,
                   backend: Backend) -> tuple[str | None, str | None]:
    """(template text, where it came from): an argument beats the bundle, which beats the model file."""
    if isinstance(chat_template, os.PathLike):
        return Path(chat_template).read_text(encoding="utf-8"), "argument"
    if chat_template is not None:
        return chat_template, "argument"
    manifest = resolved.manifest
    if manifest is not None and manifest.chat_template is not None:
        return (resolved.bundle_dir / manifest.chat_template).read_text(encoding="utf-8"), "bundle"
    if backend.chat_template:
        return backend.chat_template, "model"
    return None, None


def _pick(*values: Any) -> Any:
    """The first value that is not None."""
    return next((v for v in values if v is not None), None)


class Runtime:
    """A loaded model ready to generate. Create with ``Runtime.load``."""

    def __init__(self, backend: Backend, info: RuntimeInfo, chat_template: str | None,
                 early_exit: "early_exits.Setup | None" = None) -> None:
        self.backend = backend
        self.early_exit = early_exit      # drafting for the lossless mode, or None
        self.info = info
        self.chat_template = chat_template
        self._cached: list[int] = []      # token ids in the backend's KV cache, in order
        self._epoch = 0                   # bumped by every call; an older stream then refuses to go on
        self._closed = False

    @classmethod
    def load(cls, path: str | os.PathLike, *, n_ctx: int | None = None, n_threads: int | None = None,
             n_threads_batch: int | None = None, mmap: bool = True, mlock: bool = False, verify: bool = False,
             chat_template: str | os.PathLike | None = None, provider: str | None = None,
             early_exit: str | None = None, verbose: bool = False) -> "Runtime":
        """Load a bundle folder (with ``edgellm.json``), an ONNX folder (``genai_config.json``, as
        ``edgellm convert --format onnx`` writes), or a plain ``.gguf``/``.onnx`` file.

        Explicit arguments beat the bundle's runtime settings. ``chat_template`` is template text (or a
        path to a file) used instead of the bundle's or the model's. Thread counts not given come from the
        bundle, the thread cache, or a short measurement (``info.threads_source`` says which).
        ``provider`` (ONNX models): the ONNX Runtime execution provider ("cuda", "qnn", ... or "auto"), else
        the bundle's ``runtime.provider``; ``info.provider_reason`` says why, ``info.provider_note`` reports
        a fallback to the CPU. ``early_exit`` ("off", "lossless", "confidence[:T]"; None: what the bundle's
        calibration chose) turns on drafting and verification, or the lossy confidence exit.

        Raises:
            ModelLoadError: the file is missing, unreadable, or of a format no backend here runs.
            SettingsError: ``provider`` given for a GGUF model.
            BundleError, BundleMismatchError: a bad manifest, or files that differ from it.
        """
        start = time.perf_counter()
        resolved = bundles.resolve(path, verify=verify)
        settings = resolved.manifest.runtime if resolved.manifest else bundles.RuntimeSettings()
        # mmap=False and mlock=True are requests; the defaults leave the choice to the bundle.
        mmap = mmap and _pick(settings.mmap, True)
        mlock = mlock or bool(settings.mlock)
        backend = _load_backend(resolved.model_path, settings, n_ctx=n_ctx, n_threads=n_threads,
                                n_threads_batch=n_threads_batch, mmap=mmap, mlock=mlock, verbose=verbose,
                                provider=_pick(provider, settings.provider))
        load_seconds = time.perf_counter() - start
        rss = psutil.Process().memory_info().rss
        try:
            choice = thread_tuning.choose(backend, resolved.model_path, n_threads=n_threads,
                                          n_threads_batch=n_threads_batch,
                                          manifest_threads=(settings.n_threads, settings.n_threads_batch))
            template, template_source = _read_template(chat_template, resolved, backend)
            early = early_exits.attach(backend, early_exit, early_exits.bundle_settings(
                resolved.manifest.extra if resolved.manifest else None), resolved.bundle_dir)
        except BaseException:
            backend.close()
            raise
        backend = early.backend
        info = RuntimeInfo(
            model_path=str(resolved.model_path), backend=backend.id,
            model_name=backend.metadata.get("general.name") or resolved.model_path.stem,
            file_size_bytes=resolved.model_path.stat().st_size, n_ctx=backend.n_ctx,
            n_ctx_train=backend.n_ctx_train, n_vocab=backend.n_vocab, n_batch=getattr(backend, "n_batch", 0),
            kv_type=settings.kv_type or DEFAULT_KV_TYPE, n_threads=choice.n_threads,
            n_threads_batch=choice.n_threads_batch, threads_source=choice.source,
            threads_tuning_seconds=choice.seconds if choice.source == "tuned" else 0.0,
            load_seconds=load_seconds, rss_after_load_bytes=rss, mmap=mmap,
            mlock=bool(getattr(backend, "mlock_locked", False)), mlock_note=getattr(backend, "mlock_note", None),
            bundle_dir=str(resolved.bundle_dir) if resolved.bundle_dir else None,
            chat_template_source=template_source, provider=getattr(backend, "provider", None),
            provider_reason=getattr(backend, "provider_reason", None),
            provider_note=getattr(backend, "provider_note", None), early_exit=str(early.mode),
            early_exit_note=early.note)
        logger.info("loaded %s in %.2f s (%s, n_ctx %d, threads %d/%d %s)", info.model_path, load_seconds,
                    info.backend, info.n_ctx, info.n_threads, info.n_threads_batch, info.threads_source)
        return cls(backend, info, template, early)

    # --- tokens ---

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds BOS as the model expects. Special-token text such
        as ``<start_of_turn>`` becomes its id."""
        return self.backend.tokenize(text, add_special=add_special, parse_special=True)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.backend.detokenize(list(ids))

    def _prompt(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        ids = [int(t) for t in prompt]
        bad = next((t for t in ids if not 0 <= t < self.backend.n_vocab), None)
        if bad is not None:
            raise SettingsError("prompt", str(bad), f"token id outside the vocabulary [0, {self.backend.n_vocab})")
        return ids

    # --- generation ---

    def stream(self, prompt: str | Sequence[int], settings: GenerationSettings | None = None,
               **overrides: Any) -> Iterator[Chunk]:
        """Generate from ``prompt`` (text or token ids), one Chunk per token, then a final Chunk with the
        finish reason and stats. Settings: ``settings`` with keyword ``overrides`` (see GenerationSettings).

        Raises ContextOverflowError (prompt longer than the context) and SettingsError right away.
        """
        tokens, settings = self._prompt(prompt), with_overrides(settings, overrides)
        check_prompt(tokens, self.backend.n_ctx)
        return self._stream(tokens, settings)

    def generate(self, prompt: str | Sequence[int], settings: GenerationSettings | None = None,
                 **overrides: Any) -> Completion:
        """Like ``stream`` but returns the whole Completion."""
        return collect(self.stream(prompt, settings, **overrides))

    def _stream(self, prompt: list[int], settings: GenerationSettings, dropped: int = 0) -> Iterator[Chunk]:
        epoch = self._begin()
        source, counters = plain_tokens, None
        if self.early_exit is not None and self.early_exit.draft is not None:
            counters = DraftCounters()
            source = self.early_exit.token_source(counters)
        for chunk in run(self.backend, self._cached, prompt, settings, source=source, counters=counters):
            if chunk.stats is not None and dropped:
                chunk = dataclasses.replace(chunk, stats=dataclasses.replace(chunk.stats, dropped_messages=dropped))
            yield chunk
            if self._epoch != epoch:
                raise RuntimeError("this stream was superseded by a later call on the same Runtime")

    def _begin(self) -> int:
        if self._closed:
            raise RuntimeError("the Runtime is closed")
        self._epoch += 1
        return self._epoch

    # --- chat ---

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text the chat template makes of ``messages``.

        Raises NoChatTemplateError (no template anywhere), ChatTemplateError, InvalidMessagesError.
        """
        if self.chat_template is None:
            raise NoChatTemplateError(self.info.model_name)
        special = self.backend.special
        return chats.render(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                            bos_token=special.bos_text, eos_token=special.eos_text)

    def chat_tokens(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of the rendered chat prompt (BOS added only if the template did not write it)."""
        text = self.render_chat(messages, add_generation_prompt=True)
        bos = self.backend.special.bos_text
        return self.tokenize(text, add_special=not (bos and text.startswith(bos)))

    def stream_chat(self, messages: Sequence[dict], settings: GenerationSettings | None = None, *,
                    on_overflow: str = "error", **overrides: Any) -> Iterator[Chunk]:
        """Stream the assistant's reply to ``messages``. The prompt plus ``max_tokens`` must fit the
        context: ``on_overflow="error"`` raises ContextOverflowError, ``"drop_oldest"`` leaves out the
        oldest turns (system messages stay) and reports how many in ``stats.dropped_messages``."""
        settings = with_overrides(settings, overrides)
        messages = chats.validate_messages(messages)
        # Each candidate is a shorter conversation than the last, so its length identifies it.
        tokens_by_length: dict[int, list[int]] = {}

        def count(candidate: list[dict]) -> int:
            if len(candidate) not in tokens_by_length:
                tokens_by_length[len(candidate)] = self.chat_tokens(candidate)
            return len(tokens_by_length[len(candidate)])

        fitted, dropped = chats.fit_messages(messages, count, self.backend.n_ctx, settings.max_tokens, on_overflow)
        if dropped:
            logger.warning("dropped the %d oldest chat message(s) to fit the %d-token context",
                           dropped, self.backend.n_ctx)
        return self._stream(tokens_by_length[len(fitted)], settings, dropped)

    def chat(self, messages: Sequence[dict], settings: GenerationSettings | None = None, *,
             on_overflow: str = "error", **overrides: Any) -> Completion:
        """Like ``stream_chat`` but returns the whole Completion."""
        return collect(self.stream_chat(messages, settings, on_overflow=on_overflow, **overrides))

    # --- scoring ---

    def logits(self, tokens: Sequence[int], *, start: int = 0, positions: Sequence[int] | None = None) -> np.ndarray:
        """Logits after each of ``positions`` (indices into ``tokens``, each >= ``start``; default every
        position from ``start`` on). Row i predicts the token after ``tokens[positions[i]]``.

        ``tokens[:start]`` is context only: it is reused from the KV cache when the cache already holds
        it, else evaluated without logits. Returns float32 (len(positions), n_vocab).
        """
        tokens = self._prompt(tokens)
        if not 0 <= start <= len(tokens):
            raise SettingsError("start", str(start), f"must be within [0, {len(tokens)}]")
        wanted = list(range(start, len(tokens))) if positions is None else [int(p) for p in positions]
        if any(p < start or p >= len(tokens) for p in wanted):
            raise SettingsError("positions", str(wanted), f"must lie in [start={start}, {len(tokens)})")
        self._begin()
        if start == len(tokens) or not wanted:
            return np.empty((0, self.backend.n_vocab), np.float32)
        reused = min(common_prefix(self._cached, tokens), start)
        if not self.backend.truncate(reused):
            reused = 0
        del self._cached[reused:]
        order = output_indices(len(tokens) - reused, [p - reused for p in wanted])
        with cache_guard(self.backend, self._cached):
            rows = self.backend.decode(tokens[reused:], order)
        self._cached.extend(tokens[reused:])
        return rows[np.searchsorted(order, [p - reused for p in wanted])]

    # --- lifetime ---

    def reset(self) -> None:
        """Empty the KV cache (the next call evaluates its whole prompt)."""
        self._begin()
        self.backend.truncate(0)
        self._cached.clear()

    def close(self) -> None:
        """Free the model; idempotent."""
        if not self._closed:
            self._closed = True
            self._epoch += 1
            for close in (self.early_exit.closers if self.early_exit else ()):
                close()                      # draft contexts share the model: free them first
            self.backend.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _load_backend(model_path: Path, settings: bundles.RuntimeSettings, *, n_ctx: int | None,
                  n_threads: int | None, n_threads_batch: int | None, mmap: bool, mlock: bool,
                  verbose: bool, provider: str | None = None) -> Backend:
    """Load ``model_path`` with the backend for its format; explicit arguments beat ``settings``."""
    loader = _LOADERS.get(model_path.suffix.lower())
    if loader is None:
        raise ModelLoadError(str(model_path), f"no backend here runs {model_path.suffix or 'extension-less'} files; "
                                              f"supported: {', '.join(_LOADERS)}")
    cores = thread_tuning.core_counts_quick()
    return loader(model_path, n_ctx=_pick(n_ctx, settings.n_ctx),
                  n_threads=_pick(n_threads, settings.n_threads, cores[0]),
                  n_threads_batch=_pick(n_threads_batch, n_threads, settings.n_threads_batch, cores[1]),
                  n_batch=settings.n_batch, mmap=mmap, mlock=mlock, kv_type=settings.kv_type or DEFAULT_KV_TYPE,
                  n_gpu_layers=_pick(settings.n_gpu_layers, -1), verbose=verbose, provider=provider)


def _load_gguf(model_path: Path, *, n_batch: int | None, provider: str | None = None, **options: Any) -> Backend:
    if provider is not None:
        raise SettingsError("provider", provider, "execution providers are for ONNX models; llama.cpp picks its "
                                                  "GPU backend at build time (GGUF models run with n_gpu_layers)")
    from edgellm.runtime.llamacpp import DEFAULT_N_BATCH, LlamaCppBackend
    return LlamaCppBackend.load(model_path, n_batch=n_batch or DEFAULT_N_BATCH, **options)


def _load_onnx(model_path: Path, **options: Any) -> Backend:
    from edgellm.runtime import onnx
    return onnx.load(model_path, **options)


# model file suffix -> loader
_LOADERS = {".gguf": _load_gguf, ".onnx": _load_onnx}
