"""Bundles: a folder holding a model file, its manifest ``edgellm.json`` and the settings to run it with.

The manifest (``schema_version`` 1) lists every file with its size and sha256, names the model file to
load, and carries the runtime settings ``edgellm fit`` chose for the target device::

    {
      "schema_version": 1,
      "model": "model.gguf",
      "files": [{"path": "model.gguf", "size": 253151904, "sha256": "a5fd...", "role": "model"}],
      "runtime": {"n_ctx": 4096, "n_threads": 4, "n_threads_batch": 6, "n_batch": 512, "kv_type": "f16",
                  "n_gpu_layers": 0, "mmap": true, "mlock": false},
      "chat_template": "chat_template.jinja"
    }

Our own file, so unknown keys are refused (a typo must not be ignored silently). The sections ``plan``,
``target``, ``source`` and ``created`` are opaque here: they belong to ``edgellm fit``.
Loading checks every listed file's size (cheap); ``verify=True`` also hashes them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from edgellm.errors import BundleError, BundleMismatchError, ModelLoadError

MANIFEST_NAME = "edgellm.json"
SCHEMA_VERSION = 1
HASH_CHUNK_BYTES = 1 << 20
# Sections written by `edgellm fit` that the runtime carries without interpreting.
OPAQUE_SECTIONS = ("plan", "target", "source", "created", "early_exit")   # early_exit: see edgellm.early_exit.attach
MODEL_SUFFIXES = (".gguf", ".onnx")
GENAI_CONFIG = "genai_config.json"      # marks a plain ONNX folder (ONNX Runtime GenAI's layout)


@dataclass(frozen=True)
class BundleFile:
    path: str                 # relative to the bundle folder, "/"-separated
    size: int                 # bytes
    sha256: str               # lowercase hex
    role: str = ""            # "model", "chat_template", "tokenizer", ...; free text


@dataclass(frozen=True)
class RuntimeSettings:
    """Settings chosen for the target device; None means "let the runtime decide"."""

    n_ctx: int | None = None
    n_threads: int | None = None
    n_threads_batch: int | None = None
    n_batch: int | None = None
    kv_type: str | None = None          # "f16", "q8_0", ... (see edgellm.runtime.llamacpp.KV_TYPES)
    n_gpu_layers: int | None = None     # -1 = all
    mmap: bool | None = None
    mlock: bool | None = None
    provider: str | None = None         # ONNX Runtime execution provider ("cpu", "cuda", "qnn", ...); ONNX only


@dataclass(frozen=True)
class Manifest:
    model: str                          # the file to load, relative to the bundle folder
    files: tuple[BundleFile, ...]
    runtime: RuntimeSettings = RuntimeSettings()
    chat_template: str | None = None    # a Jinja file in the bundle, relative path
    schema_version: int = SCHEMA_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)   # the OPAQUE_SECTIONS present

    def file(self, path: str) -> BundleFile | None:
        return next((f for f in self.files if f.path == path), None)


@dataclass(frozen=True)
class ResolvedModel:
    """What a path given to ``Runtime.load`` points at."""

    model_path: Path
    bundle_dir: Path | None = None
    manifest: Manifest | None = None


def _check_keys(where: str, data: Mapping[str, Any], allowed: set[str], path: Path) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise BundleError(str(path), f"unknown key(s) in {where}: {', '.join(unknown)}; "
                                     f"known: {', '.join(sorted(allowed))}")


def _typed(where: str, value: Any, types: tuple[type, ...], path: Path) -> Any:
    # bool is an int in Python: refuse it where a number is meant.
    if value is not None and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
        raise BundleError(str(path), f"{where} must be {' or '.join(t.__name__ for t in types)}, got {value!r}")
    return value


def _relative(where: str, value: Any, path: Path) -> str:
    _typed(where, value, (str,), path)
    parts = Path(value).parts
    if not value or Path(value).is_absolute() or ".." in parts:
        raise BundleError(str(path), f"{where} must be a path inside the bundle, got {value!r}")
    return value


def _parse_file(entry: Any, path: Path) -> BundleFile:
    if not isinstance(entry, dict):
        raise BundleError(str(path), f"files[] entries must be objects, got {entry!r}")
    _check_keys("files[]", entry, {f.name for f in dataclasses.fields(BundleFile)}, path)
    for key in ("path", "size", "sha256"):
        if key not in entry:
            raise BundleError(str(path), f"files[] entry {entry!r} has no {key!r}")
    return BundleFile(path=_relative("files[].path", entry["path"], path),
                      size=_typed("files[].size", entry["size"], (int,), path),
                      sha256=_typed("files[].sha256", entry["sha256"], (str,), path).lower(),
                      role=_typed("files[].role", entry.get("role", ""), (str,), path))


_RUNTIME_TYPES: dict[str, tuple[type, ...]] = {
    "n_ctx": (int,), "n_threads": (int,), "n_threads_batch": (int,), "n_batch": (int,),
    "kv_type": (str,), "n_gpu_layers": (int,), "mmap": (bool,), "mlock": (bool,), "provider": (str,),
}


def _parse_runtime(data: Any, path: Path) -> RuntimeSettings:
    if not isinstance(data, dict):
        raise BundleError(str(path), f"runtime must be an object, got {data!r}")
    _check_keys("runtime", data, set(_RUNTIME_TYPES), path)
    return RuntimeSettings(**{k: _typed(f"runtime.{k}", v, _RUNTIME_TYPES[k], path) for k, v in data.items()})


def parse_manifest(data: Any, path: Path) -> Manifest:
    """Validate the decoded JSON of a manifest (``path`` names it in errors). Raises BundleError."""
    if not isinstance(data, dict):
        raise BundleError(str(path), "the manifest must be a JSON object")
    allowed = {"schema_version", "model", "files", "runtime", "chat_template", *OPAQUE_SECTIONS}
    _check_keys("the manifest", data, allowed, path)
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(str(path), f"schema_version {version!r} is not supported (this edgellm reads "
                                     f"{SCHEMA_VERSION}); upgrade edgellm or rebuild the bundle")
    if "model" not in data or not isinstance(data.get("files"), list):
        raise BundleError(str(path), "the manifest needs 'model' (the file to load) and a 'files' list")
    files = tuple(_parse_file(e, path) for e in data["files"])
    model = _relative("model", data["model"], path)
    if not any(f.path == model for f in files):
        raise BundleError(str(path), f"the model file {model!r} is not listed in files[]")
    template = data.get("chat_template")
    return Manifest(model=model, files=files, runtime=_parse_runtime(data.get("runtime", {}), path),
                    chat_template=None if template is None else _relative("chat_template", template, path),
                    schema_version=version, extra={k: data[k] for k in OPAQUE_SECTIONS if k in data})


def read_manifest(bundle_dir: str | Path) -> Manifest:
    """Read and validate ``bundle_dir/edgellm.json``. Raises BundleError."""
    path = Path(bundle_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(str(bundle_dir), f"no {MANIFEST_NAME} in the folder (nor the {GENAI_CONFIG} "
                                                   "of an ONNX export)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(str(path), f"cannot read the manifest: {exc}") from exc
    return parse_manifest(data, path)


def manifest_to_dict(manifest: Manifest) -> dict[str, Any]:
    """The JSON form of ``manifest`` (None runtime fields left out)."""
    data: dict[str, Any] = {"schema_version": manifest.schema_version, "model": manifest.model,
                            "files": [dataclasses.asdict(f) for f in manifest.files],
                            "runtime": {k: v for k, v in dataclasses.asdict(manifest.runtime).items() if v is not None}}
    if manifest.chat_template is not None:
        data["chat_template"] = manifest.chat_template
    data.update(manifest.extra)
    return data


def write_manifest(bundle_dir: str | Path, manifest: Manifest) -> Path:
    """Write ``edgellm.json`` atomically (temporary name, then rename); return its path."""
    path = Path(bundle_dir) / MANIFEST_NAME
    fd, tmp = tempfile.mkstemp(prefix=".edgellm.json.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(manifest_to_dict(manifest), out, indent=2)
            out.write("\n")
        os.chmod(tmp, 0o666 & ~_umask())        # mkstemp makes it 0600; a manifest is as readable as its bundle
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def describe_file(bundle_dir: str | Path, relative: str, *, role: str = "") -> BundleFile:
    """A files[] entry for ``bundle_dir/relative`` (size and sha256 computed now)."""
    path = Path(bundle_dir) / relative
    return BundleFile(path=relative, size=path.stat().st_size, sha256=sha256_file(path), role=role)


def verify_files(bundle_dir: str | Path, manifest: Manifest, *, hashes: bool = False) -> None:
    """Check every listed file exists with the listed size, and with ``hashes`` the listed sha256.

    Raises:
        BundleMismatchError: on the first file that differs (or is missing).
    """
    for entry in manifest.files:
        path = Path(bundle_dir) / entry.path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise BundleMismatchError(str(path), "size", f"{entry.size} bytes", "missing") from None
        if size != entry.size:
            raise BundleMismatchError(str(path), "size", f"{entry.size} bytes", f"{size} bytes")
    for entry in manifest.files if hashes else ():
        actual = sha256_file(Path(bundle_dir) / entry.path)
        if actual != entry.sha256:
            raise BundleMismatchError(str(Path(bundle_dir) / entry.path), "sha256", entry.sha256, actual)


def resolve(path: str | Path, *, verify: bool = False) -> ResolvedModel:
    """Resolve a bundle folder, a plain ONNX folder or a plain model file to the file to load, checking the
    manifest.

    A bundle's files are size-checked; ``verify`` also checks their sha256. A folder without ``edgellm.json``
    but with ``genai_config.json`` (``edgellm convert --format onnx``, ONNX Runtime GenAI) resolves to the
    decoder file that config names, without a manifest.

    Raises:
        ModelLoadError: the path does not exist or is neither a bundle nor a model file or folder.
        BundleError, BundleMismatchError: the manifest is invalid or a file differs from it.
    """
    path = Path(path).expanduser()
    if path.is_dir() and not (path / MANIFEST_NAME).exists() and (path / GENAI_CONFIG).exists():
        return ResolvedModel(model_path=genai_model_file(path))
    if path.is_dir():
        manifest = read_manifest(path)
        verify_files(path, manifest, hashes=verify)
        return ResolvedModel(model_path=path / manifest.model, bundle_dir=path, manifest=manifest)
    if not path.exists():
        raise ModelLoadError(str(path), "no such file or folder")
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise ModelLoadError(str(path), f"expected a bundle folder or a {' or '.join(MODEL_SUFFIXES)} file")
    return ResolvedModel(model_path=path)


def genai_model_file(folder: Path) -> Path:
    """The decoder file an ONNX Runtime GenAI folder's ``genai_config.json`` names (``model.decoder.filename``).

    Raises:
        ModelLoadError: the config cannot be read or names no file in the folder.
    """
    try:
        config = json.loads((folder / GENAI_CONFIG).read_text(encoding="utf-8"))
        name = config["model"]["decoder"]["filename"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(str(folder / GENAI_CONFIG), f"cannot read the decoder file name from it ({exc})") from None
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ModelLoadError(str(folder / GENAI_CONFIG), f"model.decoder.filename {name!r} is not a file in the folder")
    return folder / name


def _umask() -> int:
    """The process umask (reading it means setting it, so set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
