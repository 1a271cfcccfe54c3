"""Model facts from files (the I/O edge of planning): a Hugging Face checkpoint folder or a GGUF file.

Nothing is converted. A GGUF's header gives names, shapes, types and hyperparameters. A checkpoint goes
through the converter's own planning (tensor names, shapes, metadata from config.json and the headers of
its safetensors) into a *skeleton* GGUF: the real header with a sparse, never-written data region. Either
way llama.cpp's quantizer is then asked, in dry-run mode (it reads no tensor data), which type it would
give every tensor for each candidate file type: those are the exact bytes the planner adds up.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path

from edgellm.converters.quant_types import FILE_TYPES
from edgellm.errors import EdgeLLMError, FitSourceError
from edgellm.fitting.candidates import FILE_TYPE_LADDER, source_main_bits
from edgellm.fitting.facts import LLAMA_CPP_SWA, ModelFacts, TensorFact, shape_from_gguf

logger = logging.getLogger(__name__)

DTYPE_TO_TYPE = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F32"}
_FTYPE_NAMES = {ft.ftype: name for name, ft in FILE_TYPES.items()}


def write_skeleton(model_dir: Path, out_path: Path) -> tuple[str, list[str]]:
    """Write the F16 GGUF header the converter would write for ``model_dir``, data region left sparse.

    Returns (checkpoint dtype of most weights, converter notes).

    Raises:
        CheckpointError, UnsupportedArchitectureError, TokenizerError: as ``edgellm.converters.convert``.
    """
    from edgellm import converters

    main, notes = converters.write_skeleton(model_dir, out_path)
    return DTYPE_TO_TYPE.get(main, "F16"), notes


def _header_facts(path: Path, *, name: str, source: str, source_format: str, source_type: str | None):
    from edgellm.converters.quantize import read_gguf_header

    header = read_gguf_header(path)
    meta = header.metadata
    tensors = tuple(TensorFact(t.name, tuple(t.ne), t.type) for t in header.tensors)
    has_output = any(t.name == "output.weight" for t in tensors)
    try:
        shape = shape_from_gguf(meta, int(meta.get("tokenizer.ggml.tokens", 0)),
                                int(meta.get("tokenizer.ggml.merges", 0)), has_output)
    except KeyError as exc:
        raise FitSourceError(path=source, problem=f"the GGUF metadata has no {exc}") from None
    kind = source_type or _FTYPE_NAMES.get(int(meta.get("general.file_type", -1)), "mixed")
    model_name = name or str(meta.get("general.name") or Path(source).stem)
    return ModelFacts(name=model_name, source=source, source_format=source_format, source_type=kind, shape=shape,
                      tensors=tensors, notes=_shape_notes(meta, shape.architecture))


def _shape_notes(meta: dict, arch: str) -> tuple[str, ...]:
    window = meta.get(f"{arch}.attention.sliding_window")
    if window and arch not in LLAMA_CPP_SWA:
        return (f"llama.cpp runs {arch} without its {window}-token sliding window: every layer caches the "
                "full context, and the plan counts that",)
    return ()


def dry_run_recipes(gguf_path: Path, file_types: list[str], *, requantize: bool) -> dict[str, dict[str, str]]:
    """Tensor -> type for each file type, from llama.cpp's quantizer in dry-run mode. Types it refuses
    (an importance matrix needed, a failure) are left out and sized by the rules table instead."""
    from edgellm.converters.quantize import planned_types, quantize_gguf

    recipes = {}
    scratch = gguf_path.with_name(gguf_path.name + ".dry")
    for file_type in file_types:
        try:
            result = quantize_gguf(gguf_path, scratch, file_type, dry_run=True, allow_requantize=requantize)
        except EdgeLLMError as exc:
            logger.info("no dry run for %s: %s", file_type, exc)
            continue
        recipes[file_type] = planned_types(result.log)
    return recipes


def inspect_model(path: str | Path, *, exact: bool = True, file_types: tuple[str, ...] | None = None) -> ModelFacts:
    """The ``ModelFacts`` of a checkpoint folder or a GGUF file.

    ``exact``: ask llama.cpp's quantizer (dry run) for every candidate's tensor types; otherwise the planner
    uses its rules table. Needs llama-cpp-python for ``exact``; without it the table is used and logged.

    Raises:
        FitSourceError: the path is neither a checkpoint folder nor a GGUF file, or lacks metadata.
        CheckpointError, UnsupportedArchitectureError, TokenizerError: a checkpoint the converter refuses.
    """
    p = Path(path).expanduser()
    wanted = list(file_types or FILE_TYPE_LADDER)
    if p.is_file() and p.suffix.lower() == ".gguf":
        facts = _header_facts(p, name="", source=str(p), source_format="gguf", source_type=None)
        bits = source_main_bits(facts)     # only downward types are candidates for a GGUF source
        wanted = [ft for ft in wanted if FILE_TYPES[ft].nominal_bits_per_weight < bits]
        return _with_recipes(facts, p, wanted, requantize=True) if exact else facts
    if not p.is_dir():
        raise FitSourceError(path=str(p), problem="no such folder or .gguf file")
    if not (p / "config.json").is_file():
        raise FitSourceError(path=str(p), problem="the folder has no config.json")
    with tempfile.TemporaryDirectory(prefix="edgellm-fit-") as tmp:
        skeleton = Path(tmp) / "skeleton.gguf"
        dtype, notes = write_skeleton(p, skeleton)
        facts = _header_facts(skeleton, name=p.name, source=str(p), source_format="hf", source_type=dtype)
        facts = _with_recipes(facts, skeleton, wanted, requantize=False) if exact else facts
    # the skeleton says F16 for every matrix; the facts describe the checkpoint as stored
    tensors = tuple(t if t.type == "F32" else TensorFact(t.name, t.ne, dtype) for t in facts.tensors)
    return replace(facts, tensors=tensors, notes=facts.notes + tuple(dict.fromkeys(notes)))


def _with_recipes(facts: ModelFacts, path: Path, wanted: list[str], *, requantize: bool) -> ModelFacts:
    try:
        import llama_cpp  # noqa: F401 - the dry run needs it
    except ImportError:
        logger.warning("llama-cpp-python is not installed: tensor types come from edgellm's rules table")
        return facts
    return replace(facts, recipes=dry_run_recipes(path, wanted, requantize=requantize))


__all__ = ["inspect_model", "write_skeleton", "dry_run_recipes"]
