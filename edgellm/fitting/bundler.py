"""Write the bundle a plan describes (I/O): the model file, ``edgellm.json``, a llama.cpp command line and
an Ollama Modelfile, all into a temporary folder next to the destination that is renamed into place when
complete, so an interrupted build leaves no folder that looks like a bundle.

Manifest keys under ``plan``, ``target``, ``source`` and ``created`` are documented in docs/bundle.md.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgellm import __version__
from edgellm import bundle as bundles
from edgellm.errors import UsageError
from edgellm.fitting.candidates import SOURCE
from edgellm.fitting.facts import TensorFact
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
    kind = plan.facts.source_type if plan.chosen.candidate.file_type == SOURCE else plan.chosen.candidate.file_type
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", plan.facts.name).strip("-.").lower() or "model"
    return f"{stem}-{kind.lower()}.gguf"


def write_model(plan: Plan, out_path: Path) -> None:
    """Convert or quantize the source into ``out_path`` as the chosen candidate's file type."""
    file_type, source = plan.chosen.candidate.file_type, Path(plan.facts.source)
    if plan.facts.source_format == "hf":
        from edgellm.converters import convert
        convert(source, out_path, type=file_type)
    elif file_type == SOURCE:
        shutil.copyfile(source, out_path)
    else:
        from edgellm.converters.quantize import quantize_gguf
        quantize_gguf(source, out_path, file_type, allow_requantize=True)


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
                      weights: int) -> dict[str, Any]:
    """The sections ``edgellm fit`` owns in the manifest: plan, target, source, created."""
    plan_data = plan.to_dict()
    plan_data["memory"]["written_weights_bytes"] = weights
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
    return bundles.RuntimeSettings(n_ctx=rt.n_ctx, n_threads=rt.n_threads, n_threads_batch=rt.n_threads_batch,
                                   n_batch=rt.n_batch, kv_type=rt.kv_type, n_gpu_layers=rt.n_gpu_layers,
                                   mmap=rt.mmap, mlock=rt.mlock)


def _check_destination(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(problem=f"{out} already exists and is not an empty folder",
                         hint_text="choose another -o folder, or remove that one first")


def build(plan: Plan, out_dir: str | Path, *, progress: Progress | None = None) -> Bundle:
    """Write the bundle for ``plan`` into ``out_dir`` (created; must not exist or be empty).

    Returns the ``Bundle``. Nothing appears at ``out_dir`` until every file and the manifest are complete.

    Raises:
        UsageError: ``out_dir`` exists and is not empty.
        EdgeLLMError: from the converter or quantizer (CheckpointError, QuantizeError, ConvertOutputError...).
    """
    out = Path(out_dir).expanduser()
    _check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{PARTIAL_PREFIX}{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        bundle = _fill(plan, tmp, progress)
        if out.exists():
            out.rmdir()                   # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle(out, bundle.manifest, out / bundle.manifest.model, bundle.weights_bytes, bundle.notes)


def _fill(plan: Plan, folder: Path, progress: Progress | None) -> Bundle:
    say = progress or (lambda stage: logger.info("%s", stage))
    name = model_file_name(plan)
    say(f"writing {name} ({plan.chosen.candidate.file_type})")
    write_model(plan, folder / name)
    weights, notes = written_weights(folder / name), []
    if weights != plan.chosen.memory.weights_bytes:
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
                                extra=manifest_sections(plan, digest, source_files, weights))
    bundles.write_manifest(folder, manifest)
    return Bundle(folder, manifest, folder / name, weights, tuple(notes))
