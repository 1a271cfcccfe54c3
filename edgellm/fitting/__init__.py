"""``edgellm fit``: size a model to a device profile, then write a bundle that runs there.

Public API (also as ``edgellm.fit`` and ``edgellm.build``)::

    from edgellm.fitting import fit, build
    plan = fit("path/to/hf-model-or.gguf", "jetson-orin", context=4096)   # -> Plan (nothing written)
    bundle = build(plan, "out/")                                          # -> Bundle (atomic)

``fit`` is I/O at the edges around the pure ``edgellm.fitting.planner.plan``: it resolves the device, reads the
model's facts (``inspect``), loads the data tables (and a device calibration for ``local``), optionally
measures candidates' quality, then plans.
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # imported lazily (PEP 562): `python -m edgellm.fitting.measure` must stay light
    from edgellm.fitting.bundler import Bundle
    from edgellm.fitting.planner import Plan

# public name -> submodule that defines it
_LAZY = {"Bundle": "bundler", "build": "bundler", "load_calibration": "calibration", "ModelFacts": "facts",
         "ModelShape": "facts", "TensorFact": "facts", "inspect_model": "inspect", "FitOptions": "planner",
         "Plan": "planner", "plan": "planner", "Tables": "tables", "builtin_tables": "tables"}

__all__ = sorted([*_LAZY, "fit"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _stock_types(file_types: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """The llama.cpp file types to dry-run: those asked for, or the stock points mixed budgets sit between."""
    from edgellm.fitting.mixed import MIXED, STOCK_POINTS

    if not file_types:
        return None
    stock = tuple(ft for ft in file_types if ft != MIXED and not ft.startswith("ONNX:"))
    return tuple(dict.fromkeys(stock + (STOCK_POINTS if MIXED in file_types else ())))


def fit(model: str | Path, device: str, *, context: int | None = None, min_tokens_per_s: float | None = None,
        max_quality_loss: float | None = None, kv_type: str | None = None,
        measure_quality: bool = False, file_types: tuple[str, ...] | None = None,
        exact_weights: bool = True, format: str = "auto", allow_prune: bool = False) -> Plan:
    """Plan ``model`` (a Hugging Face checkpoint folder or a GGUF file) for ``device`` (a profile id, family
    alias, ``local`` or a profile .toml file). Parameters mirror ``edgellm fit``'s flags.

    ``exact_weights`` asks llama.cpp's quantizer (dry run) for every candidate's tensor types. ``file_types``
    restricts the candidates to those llama.cpp file types; ``"MIXED"`` among them keeps the mixed-precision
    candidates (budgets for the converter's allocator, offered by default for 16-bit sources), ``"ONNX:int4"``
    (fp32/fp16/int8/int4) ONNX ones. ``format``: "gguf", "onnx", "both" or "auto" (ONNX when the profile's
    first backend is an ONNX Runtime provider and the source a checkpoint, else GGUF). ``allow_prune`` measures
    which blocks cost least to drop (one short evaluation per block, one per pruned model offered) and offers
    pruned models; their quality is always measured, never a prior.
    ``measure_quality`` quantizes the candidates that fit and measures their KL divergence from the 16-bit
    model on edgellm's evaluation text (minutes for small models), then plans with the measurements.

    Returns the ``Plan``; nothing is written (``build(plan, out_dir)`` does that).

    Raises:
        UnknownDeviceError, ProfileError: the device cannot be resolved.
        FitSourceError, CheckpointError, UnsupportedArchitectureError: the model cannot be read.
        UsageError: options no plan can honour.
        NoFitError: nothing fits; the message says what would, with numbers.
    """
    from edgellm.fitting.calibration import load_calibration
    from edgellm.fitting.inspect import inspect_model
    from edgellm.fitting.planner import FitOptions, plan
    from edgellm.fitting.tables import builtin_tables
    from edgellm.targets import resolve_device

    options = FitOptions(context=context, min_tokens_per_s=min_tokens_per_s, max_quality_loss=max_quality_loss,
                         kv_type=kv_type, measure_quality=measure_quality,
                         file_types=tuple(file_types) if file_types else None, format=format,
                         allow_prune=allow_prune)
    options.check()
    resolved = resolve_device(device)
    tables = builtin_tables().calibrated(load_calibration(resolved.profile.id) if device == "local" else None)
    facts = inspect_model(model, exact=exact_weights, file_types=_stock_types(options.file_types))
    if allow_prune:
        from edgellm.fitting import prune
        if prune.not_prunable(facts) is None:
            facts = replace(facts, prunings=tuple(prune.measured_prunings(facts)))
    result = plan(facts, resolved.profile, options, tables, device_request=device, device_reason=resolved.reason)
    if measure_quality:
        from edgellm.fitting.quality_measure import measure_candidates
        facts = measure_candidates(result)
        result = plan(facts, resolved.profile, options, tables, device_request=device, device_reason=resolved.reason)
    return result
