"""Hugging Face checkpoint -> ONNX decoder with KV cache, without torch (installed as ``edgellm.converters.onnx``).

``convert_onnx(model_dir, out_dir, type=...)`` writes a folder that runs under our runtime and under ONNX
Runtime GenAI unchanged::

    model.onnx            decoder graph (ORT GenAI / Optimum I/O names), no weight bytes inside
    model.onnx.data       every weight, in one external data file, large tensors 64 KiB aligned (mmap)
    genai_config.json     ORT GenAI's configuration
    tokenizer.gguf        vocabulary for our runtime (llama.cpp's tokenizer: same ids as the GGUF path)
    tokenizer.json ...    the checkpoint's own tokenizer files

The same per-architecture tables as the GGUF converter say what every tensor is; the graph is assembled in
``decoder``/``attention``/``layers`` from ``options.Choices`` (precision and provider op set). Weights are
streamed: read from the memory-mapped checkpoint, transformed, quantized and appended one tensor (or one
chunk of rows) at a time. The folder is built as ``.OUT.partial`` next to OUT and renamed when complete.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import onnx

from edgellm import __version__
from edgellm.converters import open_model
from edgellm.converters.archs.common import Context
from edgellm.converters.onnx import decoder, files
from edgellm.converters.onnx.graph import OPSET, ExternalData, GraphBuilder
from edgellm.converters.onnx.options import PRECISIONS, PROVIDERS, Choices, for_model, resolve
from edgellm.converters.onnx.weights import Weights
from edgellm.converters.spec import ModelSpec
from edgellm.converters.tokenizer import TokenizerFiles
from edgellm.errors import CheckpointError, ConvertOutputError, UsageError

logger = logging.getLogger(__name__)

__all__ = ["OnnxConvertResult", "convert_onnx", "convert_format", "PRECISIONS", "PROVIDERS", "MODEL_FILE", "DATA_FILE"]

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
FORMAT_VERSION = "1"           # edgellm.format_version in the model's metadata_props
Progress = Callable[[int, int, str], None]     # (steps done, total steps, what was just written)


@dataclass(frozen=True)
class OnnxConvertResult:
    """What ``convert_onnx`` wrote."""

    path: Path                      # the output folder
    type: str                       # fp32, fp16, int8, int4
    provider: str                   # execution provider the graph targets
    size_bytes: int                 # model.onnx + model.onnx.data
    n_params: int                   # elements of all weights written (quantized weights count as stored)
    bits_per_weight: float          # weight bytes * 8 / parameters of the checkpoint's matrices and vectors
    seconds: float
    spec: ModelSpec
    choices: Choices
    op_counts: dict[str, int]       # op type -> nodes ("com.microsoft.GroupQueryAttention": 26, ...)
    files: tuple[str, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": "onnx", "type": self.type, "provider": self.provider,
                "size_bytes": self.size_bytes, "n_params": self.n_params,
                "bits_per_weight": round(self.bits_per_weight, 4), "seconds": round(self.seconds, 3),
                "choices": self.choices.to_dict(), "op_counts": self.op_counts, "files": list(self.files),
                "notes": list(self.notes), "model": self.spec.to_dict()}


def convert_onnx(model_dir: str | Path, out_dir: str | Path, type: str = "fp32", *, provider: str = "cpu",
                 block_size: int = 32, symmetric: bool = True, accuracy_level: int | None = None,
                 lm_head: str | None = None, context_length: int | None = None, share_embeddings: bool = False,
                 quant_method: str = "mse", progress: Progress | None = None) -> OnnxConvertResult:
    """Convert the Hugging Face checkpoint in ``model_dir`` to an ONNX folder at ``out_dir``.

    ``type``: fp32, fp16, int8 or int4 (MatMulNBits, ``block_size`` 16-256, ``symmetric`` or with zero
    points, ``accuracy_level`` 0-4; default 4 on CPU; ``quant_method`` "mse" searches each symmetric block's
    scale, "rtn" rounds as llama.cpp's Q4_0). ``provider`` picks the op set (cpu, cuda, tensorrt,
    dml, openvino, qnn, coreml). ``lm_head``: "int8", "int4" or "float" for the output projection (default:
    int8 under int4, else the model's type). ``context_length`` bounds the positions (default: trained).
    ``share_embeddings``: tied quantized models keep one copy of the table for the input Gather and the
    output projection (smaller folder, but about the table's size more resident memory under ORT's
    prepacking; the default keeps two).
    ``progress(done, total, what)`` is called after each layer.

    Returns an ``OnnxConvertResult``; the folder appears only when complete.

    Raises:
        CheckpointError, UnsafeCheckpointError, UnsupportedArchitectureError, TokenizerError: bad input.
        UnknownQuantTypeError, UsageError, ConvertTypeError: an unknown or impossible option.
        ConvertOutputError: the output cannot be written.
    """
    start = time.monotonic()
    out_dir = Path(out_dir)
    _check_target(out_dir)
    model = open_model(model_dir)
    try:
        choices = resolve(type, provider, block_size=block_size, symmetric=symmetric,
                          accuracy_level=accuracy_level, lm_head=lm_head, context_length=context_length,
                          share_embeddings=share_embeddings, quant_method=quant_method,
                          trained_context=model.spec.context_length)
        choices = for_model(choices, model.spec.rope_dim)
        partial = out_dir.with_name(f".{out_dir.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            g, copied = _write(model, partial, choices, progress)
            _publish(partial, out_dir)
        except OSError as exc:
            raise ConvertOutputError(path=str(out_dir), problem=exc.strerror or str(exc)) from None
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    finally:
        model.ckpt.close()
    notes = tuple(model.notes) + choices.notes
    for note in notes:
        logger.info("%s", note)
    size = sum((out_dir / name).stat().st_size for name in (MODEL_FILE, DATA_FILE))
    source_params = sum(math.prod(info.shape) for _, info in model.ckpt.tensors.values())
    return OnnxConvertResult(out_dir, choices.precision.name, choices.provider.name, size, g.n_params,
                             8 * g.weight_bytes / max(source_params, 1), time.monotonic() - start, model.spec,
                             choices, dict(sorted(g.op_counts.items())), tuple(copied), notes)


FORMATS = ("gguf", "onnx")


def convert_format(format: str, model_dir: str | Path, out_path: str | Path, type: str | None, *,
                   progress: Progress | None = None, gguf_options: dict[str, Any] | None = None,
                   onnx_options: dict[str, Any] | None = None) -> OnnxConvertResult:
    """``edgellm.converters.convert(..., format=...)`` for formats other than GGUF: ``convert_onnx`` with
    ``onnx_options`` (its keyword arguments) and ``type`` (default fp32).

    Raises:
        UsageError: an unknown format, GGUF-only options given (``gguf_options`` that are not None), or
            ONNX options with format "gguf".
        and whatever ``convert_onnx`` raises.
    """
    given = sorted(k for k, v in (gguf_options or {}).items() if v is not None)
    if format not in FORMATS:
        raise UsageError(problem=f"format {format!r} is not one of {', '.join(FORMATS)}",
                         hint_text="gguf: a file for llama.cpp; onnx: a folder for ONNX Runtime")
    if format == "gguf":
        raise UsageError(problem=f"{', '.join(sorted(onnx_options or {}))} only apply to format='onnx'",
                         hint_text="drop them, or pass format='onnx'")
    if given:
        raise UsageError(problem=f"{', '.join(given)} only apply to format='gguf', not '{format}'",
                         hint_text="drop them, or convert to GGUF")
    return convert_onnx(model_dir, out_path, type or "fp32", progress=progress, **(onnx_options or {}))


def _check_target(out_dir: Path) -> None:
    """Refuse to replace a folder that holds anything but a previous export."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(problem=f"output {out_dir} is a file", hint_text="pass a folder name for --format onnx")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / files.GENAI_CONFIG).is_file():
        raise UsageError(problem=f"output folder {out_dir} exists and is not an ONNX export",
                         hint_text="pass a new or empty folder")


def _publish(partial: Path, out_dir: Path) -> None:
    """Move the finished folder into place; a previous export there is replaced."""
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(partial, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _write(model, folder: Path, ch: Choices, progress: Progress | None) -> tuple[GraphBuilder, list[str]]:
    tokenizer = TokenizerFiles.read(model.ckpt)
    ctx = Context(model.spec, model.hparams, tokenizer)
    weights = Weights.open(model.ckpt, model.arch, ctx)
    data = ExternalData(folder / DATA_FILE, DATA_FILE)
    g = GraphBuilder(data)
    try:
        decoder.build(g, weights, model.spec, model.hparams, ch, _layer_progress(progress, model.spec.n_layers))
    except ValueError as exc:        # malformed rope parameters and the like in third-party configs
        raise CheckpointError(path=str(model.ckpt.path), problem=str(exc)) from None
    finally:
        data.close()
    metadata = {"edgellm.format_version": FORMAT_VERSION, "edgellm.version": __version__,
                "edgellm.type": ch.precision.name, "edgellm.provider": ch.provider.name,
                "edgellm.context_length": str(ch.context_length), "edgellm.architecture": model.spec.model_type}
    onnx.save_model(g.model(__version__, metadata), str(folder / MODEL_FILE))
    vocab = weights.shape("embed")[0]
    files.write_json(folder / files.GENAI_CONFIG, files.genai_config(model.ckpt, model.spec, ch, vocab, MODEL_FILE))
    copied = files.copy_tokenizer(model.ckpt.path, folder, ch.context_length)
    files.write_vocab_gguf(folder / files.VOCAB_GGUF, model.ckpt, model.arch, model.hparams, model.spec, tokenizer,
                           g.n_params)
    names = [MODEL_FILE, DATA_FILE, files.GENAI_CONFIG, files.VOCAB_GGUF, *copied]
    if progress is not None:
        progress(model.spec.n_layers + 1, model.spec.n_layers + 1, "files")
    logger.info("wrote %s (opset %d, %.1f MiB of weights)", folder, OPSET, g.weight_bytes / 2**20)
    return g, names


def _layer_progress(progress: Progress | None, n_layers: int) -> Callable[[int], None] | None:
    if progress is None:
        return None
    return lambda done: progress(done, n_layers + 1, f"layer {done - 1}" if done else "embeddings")
