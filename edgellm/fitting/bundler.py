"""Write the bundle a plan describes (I/O): the model file, ``edgellm.json``, a llama.cpp command line and
an Ollama Modelfile, all into a temporary folder next to the destination that is renamed into place when
complete, so an interrupted build leaves no folder that looks like a bundle.

Manifest keys under ``plan``, ``target``, ``source`` and ``created`` are documented in docs/bundle.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from edgellm import __version__
from edgellm import bundle as bundles
from edgellm.errors import UsageError
from edgellm.fitting.candidates import SOURCE
from edgellm.fitting.facts import TensorFact
from edgellm.fitting import onnx_plan
from edgellm.fitting.mixed import MIXED
from edgellm.fitting.planner import Plan
from edgellm.fitting.quant import weight_bytes

logger = logging.getLogger(__name__)

LLAMA_CPP_FILE = "llama.cpp.txt"
MODELFILE = "Modelfile"
PARTIAL_PREFIX = ".edgellm-partial-"
Progress = Callable[[str], None]          # a stage description, for a CLI to show


@dataclass(frozen=True)
class Bundle:
    """A built bundle: its folder, manifest and model file."""

    path: Path
    manifest: bundles.Manifest
    model_path: Path
    weights_bytes: int                    # tensor data of the written model file
    notes: tuple[str, ...] = ()


def model_file_name(plan: Plan) -> str:
    """``<name>-<type>.gguf`` with the name reduced to safe characters."""
    kind = plan.facts.source_type if plan.chosen.candidate.file_type == SOURCE else plan.chosen.candidate.name
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", plan.facts.name).strip("-.").lower() or "model"
    return f"{stem}-{re.sub(r'[^A-Za-z0-9._-]+', '-', kind).lower()}.gguf"


def write_model(plan: Plan, out_path: Path) -> dict[str, Any] | None:
    """Convert or quantize the source into ``out_path`` as the chosen candidate's file type. Returns the
    allocation summary of a mixed-precision candidate (``plan.allocation`` in the manifest), else None."""
    file_type, source = plan.chosen.candidate.file_type, Path(plan.facts.source)
    if file_type == MIXED:
        return write_mixed(plan, out_path)
    if plan.chosen.candidate.prune:
        write_pruned_model(plan, out_path)
        return None
    if plan.facts.source_format == "hf":
        from edgellm.converters import convert
        convert(source, out_path, type=file_type)
    elif file_type == SOURCE:
        shutil.copyfile(source, out_path)
    else:
        from edgellm.converters.quantize import quantize_gguf
        quantize_gguf(source, out_path, file_type, allow_requantize=True)
    return None


@contextlib.contextmanager
def _f16_source(plan: Plan, out_path: Path, kind: str) -> Iterator[tuple[Path, Path]]:
    """(the 16-bit GGUF of the plan's source, a scratch folder): a checkpoint is converted to F16 first. Both
    live next to the output (inside the partial bundle folder) and are removed afterwards."""
    source = Path(plan.facts.source)
    scratch = out_path.parent / f".{kind}-{out_path.stem}"
    scratch.mkdir(exist_ok=True)
    try:
        f16 = source
        if plan.facts.source_format == "hf":
            from edgellm.converters import convert
            f16 = scratch / "f16.gguf"
            convert(source, f16, type="f16")
        yield f16, scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_pruned_model(plan: Plan, out_path: Path) -> None:
    """The 16-bit source without the candidate's blocks (``prune.write_pruned``), quantized to its file type."""
    from edgellm.fitting.prune import write_pruned

    cand = plan.chosen.candidate
    with _f16_source(plan, out_path, "prune") as (f16, scratch):
        pruned = scratch / "pruned.gguf"
        write_pruned(f16, pruned, cand.prune)
        if cand.file_type in ("F16", "BF16", "F32"):
            os.replace(pruned, out_path)
        else:
            from edgellm.converters.quantize import quantize_gguf
            quantize_gguf(pruned, out_path, cand.file_type)


def file_budget(f16_gguf: Path, weights_budget: int) -> int:
    """The file budget for ``quantize_to_budget`` whose tensor data stays within ``weights_budget`` bytes:
    the weights plus the F16 file's header and the room the allocator keeps for llama.cpp's imatrix keys (its
    JSON record then comes out of the weights' share, so they land a little under the plan)."""
    from edgellm.converters.quantize import read_gguf_header
    from edgellm.converters.sensitivity import IMATRIX_KV_RESERVE

    return weights_budget + read_gguf_header(f16_gguf).data_start + IMATRIX_KV_RESERVE


def write_mixed(plan: Plan, out_path: Path) -> dict[str, Any]:
    """Measure the source's sensitivity and write the allocation for the candidate's budget
    (``converters.sensitivity.quantize_to_budget``)."""
    from edgellm.converters.sensitivity import quantize_to_budget

    cand = plan.chosen.candidate
    with _f16_source(plan, out_path, "mixed") as (f16, _scratch):
        budget = file_budget(f16, cand.weights_budget)
        result, allocation = quantize_to_budget(f16, out_path, budget, budget_label=cand.label)
    return {"weights_budget_bytes": cand.weights_budget, "file_budget_bytes": budget,
            "file_bytes": result.size_bytes, "expected_kld": allocation.expected_loss,
            "types": allocation.type_counts()}


def written_weights(path: Path) -> int:
    from edgellm.converters.quantize import read_gguf_header

    tensors = tuple(TensorFact(t.name, tuple(t.ne), t.type) for t in read_gguf_header(path).tensors)
    return weight_bytes(tensors, {t.name: t.type for t in tensors})


def source_digest(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """sha256 of the source: of the file itself, or for a checkpoint folder of the sorted list of its
    config, tokenizer and weight files' ``<sha256>  <name>`` lines (as ``sha256sum`` prints them)."""
    if path.is_file():
        return bundles.sha256_file(path), []
    names = sorted(p.name for p in path.iterdir() if p.is_file() and (p.suffix in (".json", ".safetensors", ".model")))
    files = [{"path": n, "size": (path / n).stat().st_size, "sha256": bundles.sha256_file(path / n)} for n in names]
    listing = "".join(f"{f['sha256']}  {f['path']}\n" for f in files)
    return hashlib.sha256(listing.encode()).hexdigest(), files


def llama_cpp_command(plan: Plan, model_name: str) -> str:
    """llama.cpp command lines with the plan's settings (same context, threads, batch, cache, offload)."""
    rt = plan.runtime
    args = [f"-m {model_name}", f"-c {rt.n_ctx}", f"-t {rt.n_threads}", f"-tb {rt.n_threads_batch}",
            f"-b {rt.n_batch}", f"-ub {rt.n_batch}", f"-ctk {rt.kv_type}", f"-ctv {rt.kv_type}",
            f"-ngl {'all' if rt.n_gpu_layers < 0 else rt.n_gpu_layers}", f"-fa {'on' if rt.flash_attn else 'off'}"]
    args += ["--swa-full"] if rt.swa_full and plan.facts.shape.n_swa_layers else []
    args += [] if rt.mmap else ["--no-mmap"]
    args += ["--mlock"] if rt.mlock else []
    line = " ".join(args)
    return (f"# llama.cpp with the settings edgellm fit planned for {plan.profile.id} "
            f"({plan.chosen.memory.total_bytes / 2**20:.0f} MiB predicted)\n"
            f"llama-cli {line}\nllama-server {line} --parallel 1\n")


def ollama_modelfile(plan: Plan, model_name: str) -> str:
    """An Ollama Modelfile with matching parameters (Ollama sets the KV cache type server-wide)."""
    rt = plan.runtime
    lines = [f"# Ollama Modelfile written by edgellm fit for {plan.profile.id}",
             f"# KV cache type {rt.kv_type}: set OLLAMA_KV_CACHE_TYPE={rt.kv_type} and OLLAMA_FLASH_ATTENTION=1 "
             "on the server" if rt.kv_type != "f16" else "# KV cache: f16 (Ollama's default)",
             f"FROM ./{model_name}", f"PARAMETER num_ctx {rt.n_ctx}", f"PARAMETER num_thread {rt.n_threads}",
             f"PARAMETER num_batch {rt.n_batch}"]
    if rt.n_gpu_layers >= 0:
        lines.append(f"PARAMETER num_gpu {rt.n_gpu_layers}")
    lines += [] if rt.mmap else ["PARAMETER use_mmap false"]
    return "\n".join(lines) + "\n"


def manifest_sections(plan: Plan, source_sha256: str, source_files: list[dict[str, Any]],
                      weights: int, allocation: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sections ``edgellm fit`` owns in the manifest: plan, target, source, created."""
    plan_data = plan.to_dict()
    plan_data["memory"]["written_weights_bytes"] = weights
    if allocation is not None:
        plan_data["allocation"] = allocation
    return {
        "plan": plan_data,
        "target": plan.profile.to_dict(),
        "source": {"id": plan.facts.name, "path": plan.facts.source, "format": plan.facts.source_format,
                   "type": plan.facts.source_type, "sha256": source_sha256, "files": source_files},
        "created": {"by": f"edgellm {__version__}", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "device_request": plan.device_request},
    }


def _runtime_settings(plan: Plan) -> bundles.RuntimeSettings:
    rt = plan.runtime
    if rt.provider is not None:           # ONNX: the graph fixes the KV dtype; the provider runs every layer
        return bundles.RuntimeSettings(n_ctx=rt.n_ctx, n_threads=rt.n_threads, n_threads_batch=rt.n_threads_batch,
                                       provider=rt.provider)
    return bundles.RuntimeSettings(n_ctx=rt.n_ctx, n_threads=rt.n_threads, n_threads_batch=rt.n_threads_batch,
                                   n_batch=rt.n_batch, kv_type=rt.kv_type, n_gpu_layers=rt.n_gpu_layers,
                                   mmap=rt.mmap, mlock=rt.mlock)


def _check_destination(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(problem=f"{out} already exists and is not an empty folder",
                         hint_text="choose another -o folder, or remove that one first")


def build(plan: Plan, out_dir: str | Path, *, progress: Progress | None = None,
          early_exit: bool = False) -> Bundle:
    """Write the bundle for ``plan`` into ``out_dir`` (created; must not exist or be empty).

    ``early_exit``: also measure early exit on this machine (``edgellm.early_exit.calibrate``: exit heads,
    draft acceptance, speed) and store the heads and the choice in the bundle; only for GGUF bundles fitted
    for ``--device local``, since the measurement is only true where it is taken.
    Returns the ``Bundle``. Nothing appears at ``out_dir`` until every file and the manifest are complete.

    Raises:
        UsageError: ``out_dir`` exists and is not empty; ``early_exit`` for another device or an ONNX bundle.
        EdgeLLMError: from the converter or quantizer (CheckpointError, QuantizeError, ConvertOutputError...).
    """
    out = Path(out_dir).expanduser()
    _check_destination(out)
    if early_exit:
        _check_early_exit(plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{PARTIAL_PREFIX}{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        bundle = _fill(plan, tmp, progress)
        if early_exit:
            bundle = _calibrate_early_exit(bundle, tmp, progress)
        if out.exists():
            out.rmdir()                   # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle(out, bundle.manifest, out / bundle.manifest.model, bundle.weights_bytes, bundle.notes)


def _sayer(progress: Progress | None) -> Progress:
    """Where build stages are announced: the caller's ``progress``, else the log."""
    return progress or (lambda stage: logger.info("%s", stage))


def _check_early_exit(plan: Plan) -> None:
    if plan.device_request != "local":
        raise UsageError(problem=f"early exit is measured on the machine that runs the bundle, not for "
                                 f"{plan.profile.id}", hint_text="run `edgellm exit calibrate BUNDLE` on the device, "
                                                                  "or fit with --device local")
    if onnx_plan.is_onnx(plan.chosen.candidate.file_type):
        raise UsageError(problem="early exit calibration needs a GGUF bundle (llama.cpp)",
                         hint_text="fit with --format gguf")


def _calibrate_early_exit(bundle: Bundle, folder: Path, progress: Progress | None) -> Bundle:
    """Measure early exit on the finished (still partial) bundle; heads and settings go into it."""
    from edgellm.early_exit.calibrate import calibrate

    _sayer(progress)("measuring early exit on this machine")
    result = calibrate(folder)
    note = f"early exit: {result.mode} ({result.reason})"
    return dataclasses.replace(bundle, manifest=bundles.read_manifest(folder), notes=(*bundle.notes, note))


def _fill_onnx(plan: Plan, folder: Path, say: Progress) -> Bundle:
    """The ONNX converter's folder (model.onnx, its data file, genai_config.json, tokenizer files) as the
    bundle: ONNX Runtime GenAI runs it as it is, edgellm through the manifest."""
    from edgellm.converters.onnx import DATA_FILE, MODEL_FILE, convert_onnx

    cand, rt = plan.chosen.candidate, plan.runtime
    say(f"writing {MODEL_FILE} ({cand.file_type} for {rt.provider})")
    staging = folder / ".onnx"
    result = convert_onnx(plan.facts.source, staging, onnx_plan.onnx_type(cand.file_type), provider=rt.provider,
                          context_length=cand.n_ctx)
    for item in staging.iterdir():
        os.rename(item, folder / item.name)
    staging.rmdir()
    weights, notes = (folder / DATA_FILE).stat().st_size, [*result.notes]
    if weights != plan.chosen.memory.weights_bytes:
        notes.append(f"the written weights are {weights} bytes, the plan sized {plan.chosen.memory.weights_bytes}")
        logger.warning("%s", notes[-1])
    say("hashing the source and the bundle files")
    digest, source_files = source_digest(Path(plan.facts.source))
    files = tuple(bundles.describe_file(folder, name, role="model" if name == MODEL_FILE else "")
                  for name in sorted(result.files))
    manifest = bundles.Manifest(model=MODEL_FILE, files=files, runtime=_runtime_settings(plan),
                                extra=manifest_sections(plan, digest, source_files, weights))
    bundles.write_manifest(folder, manifest)
    return Bundle(folder, manifest, folder / MODEL_FILE, weights, tuple(notes))


def _fill(plan: Plan, folder: Path, progress: Progress | None) -> Bundle:
    say = _sayer(progress)
    if onnx_plan.is_onnx(plan.chosen.candidate.file_type):
        return _fill_onnx(plan, folder, say)
    name = model_file_name(plan)
    first = ": measuring sensitivity first" if plan.chosen.candidate.weights_budget else ""
    say(f"writing {name} ({plan.chosen.candidate.name}{first})")
    allocation = write_model(plan, folder / name)
    weights, notes = written_weights(folder / name), []
    if allocation is not None:
        notes.append(f"mixed precision: {allocation['types']} in {weights} bytes of weights (budget "
                     f"{plan.chosen.candidate.weights_budget}); the measured loss model expects KLD "
                     f"{allocation['expected_kld']:.4f}")
        logger.info("%s", notes[-1])
    elif weights != plan.chosen.memory.weights_bytes:
        notes.append(f"the written weights are {weights} bytes, the plan sized {plan.chosen.memory.weights_bytes}")
        logger.warning("%s", notes[-1])
    (folder / LLAMA_CPP_FILE).write_text(llama_cpp_command(plan, name), encoding="utf-8")
    (folder / MODELFILE).write_text(ollama_modelfile(plan, name), encoding="utf-8")
    say("hashing the source and the bundle files")
    digest, source_files = source_digest(Path(plan.facts.source))
    files = (bundles.describe_file(folder, name, role="model"),
             bundles.describe_file(folder, LLAMA_CPP_FILE, role="llama.cpp command line"),
             bundles.describe_file(folder, MODELFILE, role="ollama modelfile"))
    manifest = bundles.Manifest(model=name, files=files, runtime=_runtime_settings(plan),
                                extra=manifest_sections(plan, digest, source_files, weights, allocation))
    bundles.write_manifest(folder, manifest)
    return Bundle(folder, manifest, folder / name, weights, tuple(notes))
