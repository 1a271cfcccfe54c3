"""Typed errors and the one table that turns them into messages.

Every error carries the bad value as fields. ``MESSAGES`` maps each class to a message template (what
went wrong, naming the value), a hint (the next step) and the CLI exit code. ``str(error)`` renders the
message, so library users and the CLI see the same words.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class EdgeLLMError(Exception):
    """Base class: subclasses are dataclasses whose fields fill their row of ``MESSAGES``."""

    def __str__(self) -> str:
        return render(self)[0]

    @property
    def hint(self) -> str:
        return render(self)[1]

    @property
    def exit_code(self) -> int:
        return MESSAGES[type(self)][2]


@dataclass
class UnknownDeviceError(EdgeLLMError):
    name: str
    known: list[str]


@dataclass
class ProfileError(EdgeLLMError):
    path: str
    problem: str


@dataclass
class ProbeError(EdgeLLMError):
    what: str
    problem: str


@dataclass
class MissingDependencyError(EdgeLLMError):
    package: str
    extra: str
    purpose: str


@dataclass
class CheckpointError(EdgeLLMError):
    path: str
    problem: str


@dataclass
class UnsafeCheckpointError(EdgeLLMError):
    path: str
    files: list[str] = field(default_factory=list)


@dataclass
class UnsupportedArchitectureError(EdgeLLMError):
    model_type: str
    supported: list[str]


@dataclass
class TokenizerError(EdgeLLMError):
    path: str
    problem: str


@dataclass
class UsageError(EdgeLLMError):
    problem: str
    hint_text: str = "run with --help to see the options"


def _join(names: list[str]) -> str:
    return ", ".join(names)


# class -> (message template, hint template, exit code). Templates format with the error's fields.
MESSAGES: dict[type, tuple[str, str, int]] = {
    UnknownDeviceError: ("unknown device {name!r}",
                         "known devices and aliases: {known_joined}; or pass `local` or a profile .toml file", 2),
    ProfileError: ("device profile {path}: {problem}",
                   "fix the file (see `edgellm devices show jetson-orin-nano-8gb` for a valid profile)", 2),
    ProbeError: ("could not read {what}: {problem}", "run with EDGELLM_DEBUG=1 for details", 3),
    MissingDependencyError: ("{purpose} needs the Python package {package!r}",
                             "install it with: pip install 'edgellm[{extra}]'", 4),
    CheckpointError: ("checkpoint {path}: {problem}",
                      "check that the folder is a complete Hugging Face checkpoint (config.json + *.safetensors)", 5),
    UnsafeCheckpointError: ("{path} holds only pickle checkpoints ({files_joined}); edgellm never unpickles",
                            "convert the checkpoint to safetensors first (for example with the `safetensors` "
                            "convert tool on a trusted machine)", 5),
    UnsupportedArchitectureError: ("unsupported architecture {model_type!r}; supported: {supported_joined}",
                                   "pick a model of a supported architecture", 5),
    TokenizerError: ("tokenizer in {path}: {problem}",
                     "the folder needs tokenizer.model (SentencePiece) or tokenizer.json (BPE)", 5),
    UsageError: ("{problem}", "{hint_text}", 2),
}


def render(error: EdgeLLMError) -> tuple[str, str]:
    """Return (message, hint) for ``error`` from ``MESSAGES``."""
    message, hint, _ = MESSAGES[type(error)]
    values = dict(vars(error))
    values.update({f"{k}_joined": _join(v) for k, v in vars(error).items() if isinstance(v, list)})
    return message.format(**values), hint.format(**values)
