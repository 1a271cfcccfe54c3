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


@dataclass
class UnknownQuantTypeError(EdgeLLMError):
    name: str
    kind: str            # "file type" or "tensor type"
    known: list[str]


@dataclass
class QuantTypeRowError(EdgeLLMError):
    tensor: str
    n_per_row: int
    type: str
    block_size: int
    option: str          # where the type came from, e.g. "--token-embedding-type"
    alternatives: list[str] = field(default_factory=list)


@dataclass
class ImatrixRequiredError(EdgeLLMError):
    type: str
    reason: str


@dataclass
class ImatrixError(EdgeLLMError):
    path: str
    problem: str
    hint_text: str = ("use a file written by llama-imatrix or edgellm (GGUF with .in_sum2/.counts tensors, or the "
                      "legacy .dat), computed on this model")


@dataclass
class QuantizeError(EdgeLLMError):
    path: str
    problem: str


@dataclass
class ConvertOutputError(EdgeLLMError):
    path: str
    problem: str


@dataclass
class ConvertTypeError(EdgeLLMError):
    type: str
    problem: str
    hint_text: str


# --- runtime (edgellm.runtime, edgellm.bundle) ---

@dataclass
class ModelLoadError(EdgeLLMError):
    path: str
    problem: str


@dataclass
class BundleError(EdgeLLMError):
    path: str
    problem: str


@dataclass
class BundleMismatchError(EdgeLLMError):
    path: str
    what: str            # "size" or "sha256"
    expected: str
    actual: str


@dataclass
class NoChatTemplateError(EdgeLLMError):
    model: str


@dataclass
class ChatTemplateError(EdgeLLMError):
    problem: str


@dataclass
class InvalidMessagesError(EdgeLLMError):
    problem: str


@dataclass
class ContextOverflowError(EdgeLLMError):
    n_tokens: int        # tokens the request needs (prompt plus max_tokens where that applies)
    n_ctx: int
    what: str            # "prompt" or "prompt + max_tokens"


@dataclass
class SettingsError(EdgeLLMError):
    name: str
    value: str
    problem: str


@dataclass
class DecodeError(EdgeLLMError):
    code: int
    problem: str


# --- evaluation (edgellm.evaluate) ---

@dataclass
class TokenizerMismatchError(EdgeLLMError):
    model: str
    reference: str
    problem: str


@dataclass
class EvalTextError(EdgeLLMError):
    source: str
    problem: str


# --- fitting (edgellm.fitting) ---

@dataclass
class NoFitError(EdgeLLMError):
    model: str
    device: str
    problem: str         # what rules every candidate out, with numbers
    suggestions: list[str] = field(default_factory=list)   # what would fit, with numbers


@dataclass
class FitSourceError(EdgeLLMError):
    path: str
    problem: str


@dataclass
class OnnxRunError(EdgeLLMError):
    path: str
    problem: str


@dataclass
class MeasureError(EdgeLLMError):
    path: str
    problem: str


@dataclass
class BudgetError(EdgeLLMError):
    budget: str          # as asked, e.g. "120.00 MB" or "3.10 bits per weight"
    problem: str         # why no choice of types fits, with numbers
    hint_text: str


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
    UnknownQuantTypeError: ("unknown {kind} {name!r}", "known {kind}s: {known_joined}", 2),
    QuantTypeRowError: ("{type} ({option}) cannot hold {tensor}: its rows have {n_per_row} weights, "
                        "not a multiple of the {block_size}-weight {type} block",
                        "give this tensor one of {alternatives_joined} (their blocks divide {n_per_row}), or drop "
                        "the {option} so llama.cpp picks a type that fits", 2),
    ImatrixRequiredError: ("{type} needs an importance matrix: {reason}",
                           "pass --imatrix auto (computed from the bundled calibration text) or --imatrix FILE "
                           "(from llama-imatrix or `edgellm`), or pick a type such as Q4_K_M or IQ4_XS", 2),
    ImatrixError: ("importance matrix {path}: {problem}", "{hint_text}", 5),
    QuantizeError: ("quantizing {path} failed: {problem}",
                    "run with EDGELLM_DEBUG=1 to see llama.cpp's log", 6),
    ConvertOutputError: ("could not write {path}: {problem}",
                         "free some disk space or pass another output path with -o (no partial file was left)", 6),
    ConvertTypeError: ("cannot convert to {type}: {problem}", "{hint_text}", 2),
    ModelLoadError: ("could not load model {path}: {problem}",
                     "check that the file is a complete GGUF model (run with -v to see llama.cpp's log)", 5),
    BundleError: ("bundle {path}: {problem}",
                  "rebuild the bundle with `edgellm fit`, or pass the .gguf file itself", 5),
    BundleMismatchError: ("{path}: {what} is {actual}, the bundle manifest says {expected}",
                          "the file was changed or only partly copied: copy the bundle again or rebuild it", 5),
    NoChatTemplateError: ("model {model} has no chat template",
                          "pass one: chat_template=... in Python, --chat-template FILE on the command line", 2),
    ChatTemplateError: ("chat template: {problem}", "fix the template or pass another with --chat-template FILE", 2),
    InvalidMessagesError: ("chat messages: {problem}",
                           "pass a list of {{'role': ..., 'content': ...}} dicts with string content", 2),
    ContextOverflowError: ("{what} needs {n_tokens} tokens but the context holds {n_ctx}",
                           "shorten the input, lower max_tokens, load with a larger context (--ctx), "
                           "or let chat drop the oldest turns (on_overflow='drop_oldest')", 2),
    SettingsError: ("generation setting {name}={value}: {problem}", "see GenerationSettings for valid values", 2),
    DecodeError: ("llama.cpp decode failed (code {code}): {problem}", "run with -v to see llama.cpp's log", 6),
    TokenizerMismatchError: ("{model} and reference {reference} do not share a tokenizer: {problem}",
                             "compare models converted from the same checkpoint (for example a quantized file "
                             "against its f16 original)", 2),
    EvalTextError: ("evaluation text {source}: {problem}",
                    "pass a readable UTF-8 text of at least a few hundred tokens, or a smaller --ctx", 2),
    NoFitError: ("{model} does not fit {device}: {problem}", "what would fit: {suggestions_joined}", 7),
    FitSourceError: ("cannot fit {path}: {problem}",
                     "pass a Hugging Face checkpoint folder (config.json + *.safetensors) or a .gguf file", 5),
    MeasureError: ("measuring {path} failed: {problem}", "run with EDGELLM_DEBUG=1 for details", 6),
    BudgetError: ("cannot fit the model in {budget}: {problem}", "{hint_text}", 2),
    OnnxRunError: ("ONNX Runtime failed running {path}: {problem}",
                   "check that onnxruntime is recent enough for the graph's ops (GroupQueryAttention, "
                   "MatMulNBits), or re-export for this provider with --provider", 6),
}


def render(error: EdgeLLMError) -> tuple[str, str]:
    """Return (message, hint) for ``error`` from ``MESSAGES``."""
    message, hint, _ = MESSAGES[type(error)]
    values = dict(vars(error))
    values.update({f"{k}_joined": _join(v) for k, v in vars(error).items() if isinstance(v, list)})
    return message.format(**values), hint.format(**values)
