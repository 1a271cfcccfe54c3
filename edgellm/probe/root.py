"""Where the probe reads from: this machine, or a recorded tree of another device.

Everything the probe learns passes through a ``Root``: file reads, directory listings, the output of a
few commands, ``uname``, and two runtime queries (llama.cpp's build, ONNX Runtime's providers). Tests
swap the live root for a ``FixtureRoot`` that replays a recorded device.

A fixture tree looks like this (only the files the probe reads)::

    <tree>/proc/cpuinfo, <tree>/sys/devices/system/cpu/cpu0/...   files at their real paths
    <tree>/commands/<name>.txt    stdout of the one command line the probe runs for <name> (COMMANDS)
    <tree>/answers.json           {"uname": {...}, "llama_cpp": {...} | null, "onnxruntime": {...} | null}
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from edgellm.errors import ProbeError

log = logging.getLogger(__name__)

# The one argument list the probe passes to each external command. Fixtures record that output only.
COMMANDS: dict[str, tuple[str, ...]] = {
    "nvidia-smi": ("--query-gpu=name,memory.total,memory.free,compute_cap,driver_version",
                   "--format=csv,noheader,nounits"),
    "vulkaninfo": ("--summary",),
    # macOS: whole hw.* and machdep.cpu.* subtrees plus two leaves, printed as "key: value" lines
    "sysctl": ("hw", "machdep.cpu", "kern.osproductversion", "vm.swapusage"),
    "vm_stat": (),
    "pmset": ("-g", "batt"),
    "getprop": (),          # Android: every property as "[key]: [value]"
}

COMMAND_TIMEOUT_S = 10      # nvidia-smi can hang on a wedged driver; never let the probe hang with it


class Root(Protocol):
    """The probe's view of a machine. Absent things are ``None``, never errors."""

    def read_text(self, path: str) -> str | None:
        """Contents of ``path``; None when it does not exist. Raises OSError when it exists but is unreadable."""

    def list_dir(self, path: str) -> list[str] | None:
        """Sorted entry names of directory ``path``; None when it does not exist."""

    def run(self, name: str, args: Sequence[str]) -> str | None:
        """Stdout of command ``name`` with ``args``; None when the command is missing or fails."""

    def uname(self) -> dict[str, str]:
        """{"system": "Linux"|"Darwin"|..., "release": kernel release, "machine": "x86_64"|"aarch64"|"arm64"}."""

    def llama_cpp_info(self) -> dict[str, Any] | None:
        """{"version", "system_info", "gpu_offload"} of the importable llama_cpp; None when not installed."""

    def ort_info(self) -> dict[str, Any] | None:
        """{"version", "providers"} of the importable onnxruntime; None when not installed."""


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: native libraries print backend set-up lines straight to it."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class LiveRoot:
    """This machine."""

    def read_text(self, path: str) -> str | None:
        try:
            return Path(path).read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, NotADirectoryError):
            return None

    def list_dir(self, path: str) -> list[str] | None:
        try:
            return sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            log.info("cannot list %s: %s", path, exc)
            return None

    def run(self, name: str, args: Sequence[str]) -> str | None:
        exe = shutil.which(name)
        if exe is None:
            return None
        try:
            done = subprocess.run([exe, *args], capture_output=True, text=True, errors="replace",
                                  timeout=COMMAND_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.info("%s failed: %s", name, exc)
            return None
        if done.returncode != 0:
            log.info("%s exited with %d: %s", name, done.returncode, done.stderr.strip()[:200])
            return None
        return done.stdout

    def uname(self) -> dict[str, str]:
        u = platform.uname()
        return {"system": u.system, "release": u.release, "machine": u.machine}

    def llama_cpp_info(self) -> dict[str, Any] | None:
        try:
            with _quiet_fd2():
                import llama_cpp
                info = llama_cpp.llama_print_system_info()
                offload = bool(llama_cpp.llama_supports_gpu_offload())
        except (ImportError, OSError, RuntimeError) as exc:   # not installed, or its shared library will not load
            log.info("llama_cpp is not usable: %s", exc)
            return None
        text = info.decode("utf-8", errors="replace") if isinstance(info, bytes) else str(info)
        return {"version": getattr(llama_cpp, "__version__", ""), "system_info": text, "gpu_offload": offload}

    def ort_info(self) -> dict[str, Any] | None:
        try:
            import onnxruntime
        except (ImportError, OSError) as exc:
            log.info("onnxruntime is not usable: %s", exc)
            return None
        return {"version": onnxruntime.__version__, "providers": list(onnxruntime.get_available_providers())}


class FixtureRoot:
    """A recorded device: a directory tree laid out as described in the module docstring."""

    ANSWERS = "answers.json"

    def __init__(self, tree: str | Path):
        self.tree = Path(tree)
        try:
            self._answers = json.loads((self.tree / self.ANSWERS).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ProbeError(what=str(self.tree / self.ANSWERS), problem=str(exc)) from None

    def _path(self, path: str) -> Path:
        return self.tree / path.lstrip("/")

    def read_text(self, path: str) -> str | None:
        try:
            return self._path(path).read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def list_dir(self, path: str) -> list[str] | None:
        target = self._path(path)
        return sorted(p.name for p in target.iterdir()) if target.is_dir() else None

    def run(self, name: str, args: Sequence[str]) -> str | None:
        if tuple(args) != COMMANDS.get(name):
            raise ValueError(f"fixtures record only `{name} {' '.join(COMMANDS.get(name, ()))}`")
        return self.read_text(f"commands/{name}.txt")

    def uname(self) -> dict[str, str]:
        return dict(self._answers["uname"])

    def llama_cpp_info(self) -> dict[str, Any] | None:
        return self._answers.get("llama_cpp")

    def ort_info(self) -> dict[str, Any] | None:
        return self._answers.get("onnxruntime")


class Reader:
    """A root plus the bookkeeping the probe reports: which commands were found, which were absent."""

    def __init__(self, root: Root):
        self.root = root
        self.commands: dict[str, bool] = {}

    def text(self, path: str) -> str | None:
        """File contents, or None when absent or unreadable (logged): for optional files."""
        try:
            return self.root.read_text(path)
        except OSError as exc:
            log.info("cannot read %s: %s", path, exc)
            return None

    def required(self, path: str) -> str:
        """File contents of an essential file. Raises ProbeError when it is missing or unreadable."""
        try:
            text = self.root.read_text(path)
        except OSError as exc:
            raise ProbeError(what=path, problem=str(exc)) from None
        if text is None:
            raise ProbeError(what=path, problem="the file does not exist")
        return text

    def value(self, path: str) -> str:
        """A one-value file (sysfs, device tree) stripped of whitespace and NULs; "" when absent."""
        return (self.text(path) or "").replace("\x00", "").strip()

    def listing(self, path: str) -> list[str]:
        return self.root.list_dir(path) or []

    def command(self, name: str) -> str | None:
        """Run ``name`` with its COMMANDS arguments; record whether it answered."""
        out = self.root.run(name, COMMANDS[name])
        self.commands[name] = out is not None
        return out
