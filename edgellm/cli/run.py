"""``edgellm run BUNDLE -p TEXT``: generate from a prompt and stream the text to stdout.

The model and sampling flags defined here are shared with ``edgellm chat``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Iterable

from edgellm.cli.output import note, print_json
from edgellm.errors import UsageError
from edgellm.runtime import Chunk, GenerationSettings, GenerationStats, Runtime

DEFAULTS = GenerationSettings()


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE",
                   help="a bundle folder (with edgellm.json), an ONNX folder (edgellm convert --format onnx), "
                        "or a .gguf file")
    p.add_argument("--ctx", type=int, metavar="N", help="context length in tokens (default: the bundle's, else 4096)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="threads for decoding (default: the bundle's, else measured once and cached)")
    p.add_argument("--threads-batch", type=int, metavar="N", help="threads for prompt processing (default: --threads)")
    p.add_argument("--no-mmap", action="store_true", help="read the weights into memory instead of mapping the file")
    p.add_argument("--mlock", action="store_true", help="lock the weights in RAM (needs a high enough `ulimit -l`)")
    p.add_argument("--verify", action="store_true", help="check the sha256 of every bundle file before loading")
    p.add_argument("--provider", metavar="NAME",
                   help="ONNX models: ONNX Runtime execution provider (cpu, cuda, tensorrt, dml, coreml, qnn, "
                        "openvino, or auto; default: the bundle's, else the one the model was exported for, else "
                        "the probe's choice); a missing one falls back to the CPU with a warning")
    add_early_exit_flag(p)


def add_early_exit_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--early-exit", metavar="MODE",
                   help="off, lossless (draft and verify: same output) or confidence[:T] (lossy: trust the exit "
                        "head when its top-1 margin reaches T, default 0.5); default: what `edgellm exit "
                        "calibrate` chose for the bundle, else off")


def add_sampling_flags(p: argparse.ArgumentParser, max_tokens: int = DEFAULTS.max_tokens) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=max_tokens, metavar="N",
                   help=f"most tokens to generate (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=DEFAULTS.temperature, metavar="T",
                   help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=DEFAULTS.top_k, metavar="K", help="keep the K best tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=DEFAULTS.top_p, metavar="P", help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=DEFAULTS.min_p, metavar="P",
                   help="drop tokens below P times the best one's probability (0 = off)")
    p.add_argument("--repeat-penalty", type=float, default=DEFAULTS.repeat_penalty, metavar="X",
                   help="penalise the last 64 tokens (1 = off)")
    p.add_argument("--seed", type=int, metavar="N", help="random seed, for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when TEXT appears (not printed); repeatable")


def settings_from_args(args: argparse.Namespace) -> GenerationSettings:
    """GenerationSettings from the sampling flags (validated by GenerationSettings itself)."""
    return GenerationSettings(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                              seed=args.seed, stop=tuple(args.stop))


def load_runtime(args: argparse.Namespace, chat_template: str | os.PathLike | None = None) -> Runtime:
    """Runtime.load with the model flags (an mlock the OS refused is logged as a warning by the library)."""
    return Runtime.load(args.bundle, n_ctx=args.ctx, n_threads=args.threads, n_threads_batch=args.threads_batch,
                        mmap=not args.no_mmap, mlock=args.mlock, verify=args.verify, chat_template=chat_template,
                        provider=args.provider, early_exit=args.early_exit, verbose=getattr(args, "verbose", False))


def format_stats(stats: GenerationStats) -> str:
    reused = f" ({stats.reused_prompt_tokens} reused)" if stats.reused_prompt_tokens else ""
    return (f"prompt {stats.prompt_tokens} tokens{reused} at {stats.prefill_tokens_per_s:.1f} tok/s, "
            f"first token after {stats.ttft_seconds * 1000:.0f} ms; generated {stats.generated_tokens} tokens "
            f"at {stats.decode_tokens_per_s:.1f} tok/s"
            + (f"; early exit accepted {stats.accepted_tokens}/{stats.drafted_tokens} drafted tokens "
               f"({stats.acceptance_rate:.0%})" if stats.drafted_tokens else ""))


def write_stream(chunks: Iterable[Chunk]) -> Chunk:
    """Print each chunk's text to stdout as it comes; return the final chunk."""
    final = None
    for chunk in chunks:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        final = chunk
    sys.stdout.write("\n")
    return final


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="generate text from a prompt with a bundle or a .gguf file",
                              description="Load a model and stream its continuation of a prompt to stdout.")
    add_model_flags(p)
    p.add_argument("-p", "--prompt", help="the prompt (default: read stdin)")
    add_sampling_flags(p)
    p.add_argument("--stats", action="store_true", help="print speed and token counts to stderr")
    p.add_argument("--json", action="store_true", help="print the completion, stats and load info as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise UsageError("the prompt is empty", "pass -p TEXT or pipe text to stdin")
    with load_runtime(args) as runtime:
        if args.json:
            completion = runtime.generate(prompt, settings)
            print_json({"text": completion.text, "tokens": completion.tokens,
                        "finish_reason": completion.finish_reason, "stats": dataclasses.asdict(completion.stats),
                        "info": dataclasses.asdict(runtime.info)})
            return 0
        final = write_stream(runtime.stream(prompt, settings))
        info, exits = runtime.info, getattr(runtime.backend, "counters", None)   # confidence mode's exit counts
    if args.stats:
        note(f"{format_stats(final.stats)} [{final.finish_reason}]")
        if info.early_exit != "off":
            taken = f"; {exits.exits}/{exits.steps} steps exited at the reduced head" if exits else ""
            note(f"early exit {info.early_exit}: {info.early_exit_note}{taken}")
    return 0


# A path argument for chat templates; kept here so both commands read files the same way.
def read_text_file(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}", "check the path") from exc
