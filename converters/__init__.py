"""Converters from Hugging Face checkpoints to GGUF and ONNX (installed as ``edgellm.converters``).

``convert(model_dir, out_path, type)`` writes a GGUF file llama.cpp loads, without torch or transformers:
the same tensor names, layouts, transforms, types and metadata as llama.cpp's ``convert_hf_to_gguf.py``.
F32, F16, BF16 and Q8_0 are written directly; other llama.cpp types go through an F16 (or F32) GGUF and
``edgellm.converters.quantize.quantize_gguf``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import gguf

from edgellm.converters import archs
from edgellm.converters.archs.common import Architecture, Context
from edgellm.converters.checkpoint import Checkpoint, open_checkpoint
from edgellm.converters.general import general_calls
from edgellm.converters.plan import OUTPUT_TYPES, OutputType, TensorPlan, plan_tensors
from edgellm.converters.quant_types import file_type
from edgellm.converters.spec import ModelSpec, hparams
from edgellm.converters.tokenizer import TokenizerFiles
from edgellm.converters.writer import Progress, tensor_chunks, write_gguf, write_skeleton_gguf
from edgellm.errors import CheckpointError, ConvertTypeError, UsageError

if TYPE_CHECKING:
    from edgellm.converters.onnx import OnnxConvertResult    # format="onnx"; imports onnx only when used

logger = logging.getLogger(__name__)

__all__ = ["ConvertResult", "convert", "model_spec", "open_model", "write_skeleton", "OUTPUT_TYPES"]

MIXED = "MIXED"   # ConvertResult.type of a budgeted conversion: every tensor's type was chosen by measurement
# config.json torch_dtype -> safetensors dtype it announces
TORCH_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass(frozen=True)
class ConvertResult:
    """What ``convert`` wrote."""

    path: Path
    type: str                       # file type, llama.cpp spelling ("F16", "Q4_K_M")
    size_bytes: int
    n_params: int
    bits_per_weight: float          # tensor data bits / parameters
    tensor_types: dict[str, int]    # ggml type -> number of tensors stored in it
    seconds: float
    spec: ModelSpec
    notes: tuple[str, ...] = field(default_factory=tuple)   # decisions the user should know about
    imatrix_tokens: int = 0         # tokens the importance matrix was computed on (0: none computed here)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "type": self.type, "size_bytes": self.size_bytes, "n_params": self.n_params,
                "bits_per_weight": round(self.bits_per_weight, 4), "tensor_types": self.tensor_types,
                "seconds": round(self.seconds, 3), "notes": list(self.notes), "imatrix_tokens": self.imatrix_tokens,
                "model": self.spec.to_dict()}


@dataclass
class _Model:
    """An opened checkpoint with its architecture, flattened config and spec."""

    ckpt: Checkpoint
    arch: Architecture
    hparams: dict[str, Any]
    spec: ModelSpec
    notes: list[str]
    imatrix_tokens: int = 0


def open_model(model_dir: str | Path) -> _Model:
    """Open the checkpoint in ``model_dir`` with its architecture, flattened config, ``ModelSpec`` and notes
    (for the GGUF and ONNX converters). The caller closes ``.ckpt``.

    Raises:
        CheckpointError, UnsafeCheckpointError, UnsupportedArchitectureError: as ``convert``.
    """
    ckpt = open_checkpoint(model_dir)
    try:
        arch = archs.get(ckpt.config.get("model_type"))
        try:
            hp = hparams(ckpt.config, arch.defaults)
            spec = ModelSpec.from_hparams(hp, arch.name, arch.traits)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(path=str(ckpt.path / "config.json"), problem=str(exc).strip("'\"")) from None
    except BaseException:
        ckpt.close()
        raise
    notes = []
    if spec.architecture and spec.architecture not in arch.hf_architectures:
        notes.append(f"config.json architecture {spec.architecture} is converted as {arch.hf_architectures[0]}")
    return _Model(ckpt, arch, hp, spec, notes + _dtype_notes(ckpt, spec))


def _dtype_notes(ckpt: Checkpoint, spec: ModelSpec) -> list[str]:
    """A note when config.json's torch_dtype disagrees with the stored weights (llama.cpp trusts the weights too:
    "some finetunes lie")."""
    claimed = TORCH_DTYPES.get(str(spec.torch_dtype))
    stored = sorted({info.dtype for _, info in ckpt.tensors.values() if len(info.shape) >= 2})
    if claimed and stored and stored != [claimed]:
        return [f"config.json says torch_dtype {spec.torch_dtype} but the weights are stored as {'/'.join(stored)}; "
                "converting what is stored"]
    return []


def model_spec(model_dir: str | Path) -> ModelSpec:
    """The ``ModelSpec`` of a checkpoint folder (reads config.json and the safetensors headers only).

    Raises:
        CheckpointError, UnsafeCheckpointError, UnsupportedArchitectureError: as ``convert``.
    """
    model = open_model(model_dir)
    model.ckpt.close()
    return model.spec


def _metadata(model: _Model, ctx: Context, plans: list[TensorPlan], out: OutputType) -> list[tuple]:
    """Every metadata call in llama.cpp's order: general.*, hyperparameters, quantization version, vocab."""
    n_params = sum(p.n_elements for p in plans)
    calls = model.arch.early_metadata(model.hparams, model.spec)
    calls += general_calls(model.ckpt.path, n_params, model.ckpt.generation_config)
    calls += model.arch.metadata(model.hparams, model.spec, int(out.file_type))
    calls.append(("add_quantization_version", gguf.GGML_QUANT_VERSION))
    return calls + model.arch.vocab(ctx.tokenizer, model.hparams, model.spec)


def _write(model: _Model, out_path: Path, out: OutputType, quiet: bool, progress: Progress | None) -> tuple[
        int, list[TensorPlan]]:
    ctx = Context(model.spec, model.hparams, TokenizerFiles.read(model.ckpt))
    try:
        plans, notes = plan_tensors(model.ckpt, model.arch, ctx, out)
        calls = _metadata(model, ctx, plans, out)
    except ValueError as exc:   # malformed rope factors, tokenizer merges... in third-party files
        raise CheckpointError(path=str(model.ckpt.path), problem=str(exc)) from None
    model.notes += notes

    def chunks(plan: TensorPlan):
        logger.log(logging.DEBUG if quiet else logging.INFO, "%-32s %-6s -> %-5s %s", plan.name,
                   model.ckpt.info(plan.source).dtype if plan.source else "gen", plan.qtype.name, list(plan.shape))
        return tensor_chunks(model.ckpt, plan, ctx)

    return write_gguf(out_path, model.arch.gguf_name, calls, plans, chunks, progress), plans


def write_skeleton(model_dir: str | Path, out_path: str | Path) -> tuple[str, list[str]]:
    """Write the F16 GGUF header ``convert`` would write for ``model_dir``, its data region sparse and unwritten.

    For sizing without converting: llama.cpp's quantizer in dry-run mode reads only the header.
    Returns (the checkpoint dtype most weights are stored in, the converter's notes).

    Raises:
        CheckpointError, UnsupportedArchitectureError, TokenizerError: as ``convert``.
    """
    model = open_model(model_dir)
    try:
        out = OUTPUT_TYPES["F16"]
        ctx = Context(model.spec, model.hparams, TokenizerFiles.read(model.ckpt))
        try:
            plans, notes = plan_tensors(model.ckpt, model.arch, ctx, out)
            calls = _metadata(model, ctx, plans, out)
        except ValueError as exc:
            raise CheckpointError(path=str(model.ckpt.path), problem=str(exc)) from None
        dtypes = Counter(model.ckpt.info(p.source).dtype for p in plans if p.source)
    finally:
        model.ckpt.close()
    write_skeleton_gguf(Path(out_path), model.arch.gguf_name, calls, plans)
    return (dtypes.most_common(1)[0][0] if dtypes else "F16"), notes


def _quantize_module():
    """edgellm.converters.quantize, or a ConvertTypeError when this build has no llama.cpp quantizer."""
    try:
        module = importlib.import_module("edgellm.converters.quantize")
    except ModuleNotFoundError as exc:
        if exc.name != "edgellm.converters.quantize":
            raise           # the module exists but one of its own imports is missing: show that
        module = None
    if not hasattr(module, "quantize_gguf"):
        raise ConvertTypeError(type="quantized", problem="the llama.cpp quantizer is not available in this build",
                               hint_text=f"use one of {', '.join(t.lower() for t in OUTPUT_TYPES)}")
    return module


def convert(model_dir: str | Path, out_path: str | Path, type: str | None = None, *, quiet: bool = True,
            progress: Progress | None = None, imatrix: Any = None, calibration: str | Path | None = None,
            output_type: str | None = None, embedding_type: str | None = None,
            overrides: Any = None, target_size: int | str | None = None,
            target_bpw: float | None = None, format: str = "gguf",
            **onnx_options: Any) -> ConvertResult | OnnxConvertResult:
    """Convert the Hugging Face checkpoint in ``model_dir`` to a GGUF file at ``out_path``.

    ``format="onnx"`` writes an ONNX folder at ``out_path`` instead and returns its ``OnnxConvertResult``:
    ``type`` fp32 (default), fp16, int8 or int4, ``onnx_options`` as ``converters.onnx.convert_onnx``'s
    (provider, block_size, symmetric, accuracy_level, lm_head, ...); the GGUF-only options must be left out.

    ``type``: a llama.cpp file type, case-insensitive (default f16): f32, f16, bf16 and q8_0 are written
    directly, the others (q4_k_m, iq4_xs, ...) by quantizing an intermediate F16 file (F32 when F16 would
    overflow). ``progress(done, total, what)`` is called after each tensor (and each measuring step).
    ``quiet=False`` logs every tensor at INFO level. ``imatrix``, ``output_type``, ``embedding_type`` and
    ``overrides`` are passed to ``quantize_gguf`` for quantized types; with ``imatrix="auto"`` the importance
    matrix is computed on the ``calibration`` text file (default: the calibration text bundled with edgellm).

    ``target_size`` (bytes, or a string such as ``"180 MB"``) or ``target_bpw`` (bits per weight) replace
    ``type``: every tensor gets the type that minimises the expected KL divergence of the whole file within
    that budget, from per-tensor sensitivity measured on the calibration text (``converters.sensitivity``);
    the file lands at most 1% under the budget and records each tensor's type and why under the GGUF key
    ``edgellm.quantization.allocation`` (``sensitivity.read_allocation`` reads it back).

    Returns a ``ConvertResult``. The file appears only when complete (written as OUT.partial, renamed).

    Raises:
        CheckpointError, UnsafeCheckpointError: unreadable, unsafe, inconsistent or NaN/Inf checkpoints.
        UnsupportedArchitectureError: a model_type without a converter.
        TokenizerError: a missing or unsupported tokenizer.
        UnknownQuantTypeError, ConvertTypeError: an unknown type, or one this build cannot produce.
        ConvertOutputError: the output cannot be written (disk full...).
    """
    if format != "gguf" or onnx_options:
        from edgellm.converters.onnx import convert_format
        return convert_format(format, model_dir, out_path, type, progress=progress, onnx_options=onnx_options,
                              gguf_options=dict(imatrix=imatrix, calibration=calibration, output_type=output_type,
                                                embedding_type=embedding_type, overrides=overrides,
                                                target_size=target_size, target_bpw=target_bpw))
    start = time.monotonic()
    budgeted = target_size is not None or target_bpw is not None
    if budgeted:
        _check_budget_options(type, target_size, target_bpw, output_type, embedding_type, overrides)
    kind = MIXED if budgeted else file_type(type or "f16").name
    out_path = Path(out_path)
    if out_path.is_dir():
        raise UsageError(problem=f"output {out_path} is a directory", hint_text="pass a file name such as model.gguf")
    quantize_options = {k: v for k, v in dict(imatrix=imatrix, output_type=output_type,
                                               embedding_type=embedding_type, overrides=overrides).items()
                        if v is not None}
    if calibration is not None and str(imatrix) != "auto" and not budgeted:
        raise UsageError(problem="a calibration text is only used to compute an importance matrix",
                         hint_text="add --imatrix auto, or drop --calibration")
    if quantize_options and kind in OUTPUT_TYPES:
        raise UsageError(problem=f"{', '.join(quantize_options)} only apply to llama.cpp quantized types, "
                                 f"not {kind}", hint_text="drop them or pick a type such as q4_k_m")
    model = open_model(model_dir)
    try:
        if budgeted:
            size, types, data_bytes, n_params = _convert_budgeted(model, out_path, quiet, progress, imatrix,
                                                                  calibration, target_size, target_bpw)
        elif kind in OUTPUT_TYPES:
            size, plans = _write(model, out_path, OUTPUT_TYPES[kind], quiet, progress)
            types = Counter(p.qtype.name for p in plans)
            data_bytes = sum(p.nbytes for p in plans)
            n_params = sum(p.n_elements for p in plans)
        else:
            size, types, data_bytes, n_params = _convert_quantized(model, out_path, kind, quiet, progress,
                                                                   quantize_options, calibration)
    finally:
        model.ckpt.close()
    for note in model.notes:
        logger.info("%s", note)   # also returned in ConvertResult.notes, which the CLI shows
    return ConvertResult(path=out_path, type=kind, size_bytes=size, n_params=n_params,
                         bits_per_weight=8 * data_bytes / max(n_params, 1), tensor_types=dict(types),
                         seconds=time.monotonic() - start, spec=model.spec, notes=tuple(model.notes),
                         imatrix_tokens=model.imatrix_tokens)


def _convert_quantized(model: _Model, out_path: Path, kind: str, quiet: bool, progress: Progress | None,
                       options: dict[str, Any], calibration: str | Path | None) -> tuple[int, Counter, int, int]:
    """F16 (or F32) intermediate next to the output, then llama.cpp's quantizer; the intermediate is removed."""
    quantize = _quantize_module()
    with _intermediate(model, out_path, quiet, f32_fallback=True) as tmp:
        if str(options.get("imatrix")) == "auto":
            options = {**options, "imatrix": _auto_imatrix(tmp, calibration, model.notes)}
        result = quantize.quantize_gguf(tmp, out_path, kind, progress=progress, **options)
        model.notes += _fallback_notes(getattr(result, "fallbacks", []))
        model.imatrix_tokens = result.imatrix_tokens
    return _summarize(out_path, quantize.read_gguf_header(out_path))


@contextlib.contextmanager
def _intermediate(model: _Model, out_path: Path, quiet: bool, *, f32_fallback: bool) -> Iterator[Path]:
    """The F16 GGUF a quantized output is made from, hidden next to ``out_path`` and removed afterwards.

    The name keeps a ``.gguf`` suffix: the runtime loads it to measure importance and sensitivity. With
    ``f32_fallback`` weights beyond the f16 range give an F32 intermediate (noted) instead of an error; the
    budgeted path has no fallback, since F16 is one of the types its allocation may choose.
    """
    tmp = out_path.with_name(f".{out_path.name}.intermediate.gguf")
    try:
        try:
            _write(model, tmp, OUTPUT_TYPES["F16"], quiet, None)
        except ConvertTypeError:
            if not f32_fallback:
                raise
            model.notes.append("weights exceed the f16 range: quantized from an f32 intermediate")
            _write(model, tmp, OUTPUT_TYPES["F32"], quiet, None)
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _check_budget_options(type: str | None, target_size: Any, target_bpw: Any, *fixed: Any) -> None:
    """A budget chooses every tensor's type: refuse anything else that would choose one too, and budgets that
    are not sizes, before anything is written."""
    if target_size is not None and target_bpw is not None:
        raise UsageError(problem="--target-size and --target-bpw both set the budget",
                         hint_text="give one of them")
    if type is not None:
        raise UsageError(problem=f"--type {type} and a target size both choose the tensor types",
                         hint_text="drop --type: with --target-size/--target-bpw every tensor's type is chosen")
    if any(v is not None for v in fixed):
        raise UsageError(problem="--tensor-type, --output-tensor-type and --token-embedding-type fix types that "
                                 "a target size chooses", hint_text="use either a target size or fixed types")
    if target_bpw is not None and not 0 < float(target_bpw) <= 32:
        raise UsageError(problem=f"--target-bpw {target_bpw} is not a number of bits per weight",
                         hint_text="for example 4.5")
    if target_size is not None:
        _target_bytes(target_size)


def _target_bytes(target_size: int | str) -> int:
    """``target_size`` in bytes: an int, or a size with its unit ("180 MB", "200MiB")."""
    from edgellm.units import UnitError, parse_bytes

    try:
        size = int(target_size) if isinstance(target_size, int) else parse_bytes(str(target_size))
    except UnitError as exc:
        raise UsageError(problem=f"--target-size: {exc}", hint_text="for example '180 MB'") from None
    if size <= 0:
        raise UsageError(problem=f"--target-size {target_size} is not a size", hint_text="for example '180 MB'")
    return size


def _convert_budgeted(model: _Model, out_path: Path, quiet: bool, progress: Progress | None, imatrix: Any,
                      calibration: str | Path | None, target_size: int | str | None,
                      target_bpw: float | None) -> tuple[int, Counter, int, int]:
    """F16 intermediate, per-tensor sensitivity on calibration text, then the allocation through llama.cpp."""
    from edgellm.converters import sensitivity
    from edgellm.units import format_bytes

    text = _read_calibration(calibration)

    def relay(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(done, total, stage)

    with _intermediate(model, out_path, quiet, f32_fallback=False) as tmp:
        if target_bpw is not None:
            budget, label = sensitivity.budget_for_bpw(tmp, float(target_bpw)), f"{target_bpw} bits/weight"
        else:
            budget = _target_bytes(target_size)
            label = format_bytes(budget)
        result, allocation = sensitivity.quantize_to_budget(
            tmp, out_path, budget, imatrix="auto" if imatrix is None else imatrix, calibration_text=text,
            budget_label=label, progress=relay)
    counts = ", ".join(f"{n} {t}" for t, n in allocation.type_counts().items())
    model.notes.append(f"types chosen for {label} ({format_bytes(result.size_bytes)} written): {counts}; "
                       f"expected KLD {allocation.expected_loss:.4f} (recorded under {sensitivity.alloc.METADATA_KEY})")
    source = f"calibration text {calibration}" if calibration else "edgellm's bundled calibration text"
    if imatrix is not None and str(imatrix) != "auto":
        model.notes.append(f"importance matrix from {imatrix}; sensitivity measured on {source}")
    else:
        model.notes.append(f"importance matrix and sensitivity measured on {result.imatrix_tokens} tokens of "
                           f"{source}")
    model.imatrix_tokens = result.imatrix_tokens
    return _summarize(out_path, sensitivity.read_gguf_header(out_path))


def _read_calibration(calibration: str | Path | None) -> str | None:
    if calibration is None:
        return None
    try:
        return Path(calibration).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(problem=f"cannot read the calibration text {calibration}: {exc}",
                         hint_text="pass a UTF-8 text file") from None


def _auto_imatrix(gguf_path: Path, calibration: str | Path | None, notes: list[str]) -> Any:
    """Compute the importance matrix on the intermediate file, from ``calibration`` or the bundled text."""
    from edgellm.converters.imatrix import compute_imatrix

    matrix = compute_imatrix(gguf_path, text=_read_calibration(calibration))
    source = f"calibration text {calibration}" if calibration else "edgellm's bundled calibration text"
    notes.append(f"importance matrix computed on {matrix.n_tokens} tokens of {source}")
    return matrix


def _fallback_notes(fallbacks: list) -> list[str]:
    """One note per (wanted, used) pair of the types llama.cpp substituted for tensors whose rows do not fit."""
    groups: dict[tuple[str, str], list[str]] = {}
    for f in fallbacks:
        groups.setdefault((f.wanted, f.used), []).append(f.tensor)
    return [f"llama.cpp stored {len(names)} tensor(s) as {used}, not {wanted} (their rows do not split into "
            f"{wanted} blocks): {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"
            for (wanted, used), names in groups.items()]


def _summarize(path: Path, header: Any) -> tuple[int, Counter, int, int]:
    """(file size, tensor types, tensor data bytes, parameters) from a GGUF header (quantize.read_gguf_header)."""
    types = Counter(t.type for t in header.tensors)
    return (path.stat().st_size, types, sum(t.n_bytes for t in header.tensors),
            sum(t.n_elements for t in header.tensors))
