"""The early-exit modes a user can ask for: ``off``, ``lossless`` and ``confidence[:THRESHOLD]``."""

from __future__ import annotations

from dataclasses import dataclass

from edgellm.errors import SettingsError

DEFAULT_CONFIDENCE = 0.5     # top-1 minus top-2 probability of the exit head needed to skip the full head

# mode name -> whether the output is exactly the full model's (greedy tokens / sampling distribution)
MODES: dict[str, bool] = {"off": True, "lossless": True, "confidence": False}


@dataclass(frozen=True)
class EarlyExitMode:
    name: str                        # a key of MODES
    threshold: float | None = None   # confidence mode only: probability margin in (0, 1]

    @property
    def on(self) -> bool:
        return self.name != "off"

    def __str__(self) -> str:
        return f"{self.name}:{self.threshold:g}" if self.threshold is not None else self.name


def parse_mode(text: str | EarlyExitMode) -> EarlyExitMode:
    """``"off"``, ``"lossless"``, ``"confidence"`` or ``"confidence:0.3"`` as an EarlyExitMode.

    Raises:
        SettingsError: an unknown mode, or a threshold outside (0, 1].
    """
    if isinstance(text, EarlyExitMode):
        return text
    name, _, value = str(text).strip().partition(":")
    if name not in MODES:
        raise SettingsError("early_exit", repr(text), f"must be one of {', '.join(MODES)} (confidence[:T])")
    if name != "confidence":
        if value:
            raise SettingsError("early_exit", repr(text), f"{name} takes no threshold")
        return EarlyExitMode(name)
    try:
        threshold = float(value) if value else DEFAULT_CONFIDENCE
    except ValueError:
        raise SettingsError("early_exit", repr(text), "the threshold must be a number in (0, 1]") from None
    if not 0.0 < threshold <= 1.0:
        raise SettingsError("early_exit", repr(text), "the threshold must be a number in (0, 1]")
    return EarlyExitMode(name, threshold)
