"""Device profiles: data files under ``profiles/``, loaded strictly, resolved by id, alias, file or ``local``.

Public API:
    builtin_profiles() -> dict[id, DeviceProfile]
    load_profile(path) -> DeviceProfile
    resolve_device(name) -> ResolvedDevice    (id, family alias, "local" or a .toml path)
    aliases() -> dict[alias, [ids, smallest usable memory first]]
    uncovered_figures(profile) -> [dotted figure names no source backs]
"""

from __future__ import annotations

import dataclasses
import functools
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from edgellm import units
from edgellm.backends import BACKENDS
from edgellm.errors import ProfileError, UnknownDeviceError
from edgellm.targets.schema import (
    ACCELERATOR_KINDS, CPU_ARCHS, DEVICE_CLASSES, Accelerator, Cpu, CpuCluster, DeviceProfile, Memory,
    PowerMode, Source,
)

__all__ = [
    "Accelerator", "Cpu", "CpuCluster", "DeviceProfile", "Memory", "PowerMode", "Source", "ResolvedDevice",
    "aliases", "builtin_profiles", "load_profile", "parse_profile", "resolve_device", "uncovered_figures",
]

LOCAL = "local"


@dataclass(frozen=True)
class ResolvedDevice:
    profile: DeviceProfile
    requested: str
    reason: str          # how the name was resolved, shown to the user


class _Invalid(Exception):
    """Internal: a problem at a dotted location in a profile table."""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, hint: Any, unit: str | None, where: str) -> Any:
    """Check and convert one TOML value against a field's type hint (and unit, if it has one)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):   # Optional[X]: None is never written in TOML
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if unit is not None:
        try:
            number = units.parse(value, unit)
        except units.UnitError as exc:
            raise _Invalid(f"{where}: {exc}") from None
        return int(round(number)) if hint is int else number
    if origin is tuple:
        if not isinstance(value, list):
            raise _Invalid(f"{where}: expected a list, got {value!r}")
        return tuple(_convert(v, args[0], None, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise _Invalid(f"{where}: expected a table, got {value!r}")
        return _build(hint, value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise _Invalid(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from a TOML table, refusing unknown and missing keys."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise _Invalid(f"{where or 'top level'}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
    hints = _field_types(cls)
    values = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        if name not in table:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _Invalid(f"{path}: missing")
            continue
        values[name] = _convert(table[name], hints[name], f.metadata.get("unit"), path)
    return cls(**values)


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds, directly or as ``tuple[X, ...]``; None for plain values."""
    if dataclasses.is_dataclass(hint):
        return hint
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _field_paths(cls: type, prefix: str = "") -> frozenset[str]:
    """Every dotted field name of ``cls`` and its nested tables: "memory", "memory.bandwidth", ..."""
    paths: set[str] = set()
    for name, hint in _field_types(cls).items():
        paths.add(prefix + name)
        inner = _dataclass_in(hint)
        if inner is not None:
            paths |= _field_paths(inner, f"{prefix}{name}.")
    return frozenset(paths)


FIGURE_PATHS = _field_paths(DeviceProfile)
_INDEX = re.compile(r"\[\d+\]")   # "accelerators[0].int8_ops" names the same field as "accelerators.int8_ops"

# Figures every built-in profile must back with a source; accelerators and power_modes too when present.
SOURCED_FIGURES = ("memory.total", "memory.usable", "memory.bandwidth", "cpu.clusters")


def _figure(name: str) -> str:
    return _INDEX.sub("", name)


def _check_sources(profile: DeviceProfile) -> None:
    """Each source must name real fields, so a typo cannot leave a figure silently unsourced."""
    if not profile.sources:
        raise _Invalid("sources: at least one source is required")
    for i, source in enumerate(profile.sources):
        for name in source.figures:
            if _figure(name) not in FIGURE_PATHS:
                raise _Invalid(f"sources[{i}].figures: {name!r} names no profile field "
                               f"(use dotted names such as 'memory.bandwidth' or 'cpu.clusters')")


def uncovered_figures(profile: DeviceProfile, required: tuple[str, ...] = SOURCED_FIGURES) -> list[str]:
    """Return the figures in ``required`` (plus accelerators / power_modes when the profile has them) that no
    source names. A source for a table covers its fields ("memory" covers "memory.total") and a source for
    one field of a table counts for the table ("accelerators.int8_ops" counts for "accelerators")."""
    wanted = list(required)
    wanted += ["accelerators"] * bool(profile.accelerators) + ["power_modes"] * bool(profile.power_modes)
    named = {_figure(name) for source in profile.sources for name in source.figures}

    def covered(figure: str) -> bool:
        return any(n == figure or n.startswith(figure + ".") or figure.startswith(n + ".") for n in named)

    return [figure for figure in wanted if not covered(figure)]


def _check_choices(profile: DeviceProfile) -> None:
    """Cross-field checks the types cannot express."""
    if profile.device_class not in DEVICE_CLASSES:
        raise _Invalid(f"device_class: {profile.device_class!r} is not one of {', '.join(DEVICE_CLASSES)}")
    if profile.cpu.arch not in CPU_ARCHS:
        raise _Invalid(f"cpu.arch: {profile.cpu.arch!r} is not one of {', '.join(CPU_ARCHS)}")
    for i, acc in enumerate(profile.accelerators):
        if acc.kind not in ACCELERATOR_KINDS:
            raise _Invalid(f"accelerators[{i}].kind: {acc.kind!r} is not one of {', '.join(ACCELERATOR_KINDS)}")
    unknown = [b for b in profile.backends if b not in BACKENDS]
    if unknown or not profile.backends:
        raise _Invalid(f"backends: unknown {unknown or 'empty list'}; known: {', '.join(BACKENDS)}")
    if profile.memory.usable > profile.memory.total:
        raise _Invalid("memory.usable is larger than memory.total")
    if sum(mode.default for mode in profile.power_modes) > 1:
        raise _Invalid("power_modes: more than one mode is marked default")
    _check_sources(profile)


def parse_profile(table: dict[str, Any], origin: str) -> DeviceProfile:
    """Build and validate a profile from a parsed TOML table; ``origin`` names it in errors.

    Raises:
        ProfileError: on unknown keys, missing keys, wrong types, figures without units.
    """
    try:
        profile = _build(DeviceProfile, table, "")
        _check_choices(profile)
    except _Invalid as exc:
        raise ProfileError(path=origin, problem=str(exc)) from None
    return profile


def load_profile(path: str | Path) -> DeviceProfile:
    """Load one profile file. Raises ProfileError when it is unreadable or invalid."""
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(path=str(path), problem=str(exc)) from None
    return parse_profile(table, str(path))


@functools.cache
def builtin_profiles() -> dict[str, DeviceProfile]:
    """Every profile shipped under ``profiles/``, keyed by id (ids must be unique and match the file name)."""
    profiles = {}
    for entry in sorted(resources.files(__package__).joinpath("profiles").iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".toml"):
            continue
        table = tomllib.loads(entry.read_text(encoding="utf-8"))
        profile = parse_profile(table, f"{__package__}/profiles/{entry.name}")
        if profile.id != entry.name.removesuffix(".toml"):
            raise ProfileError(path=entry.name, problem=f"id {profile.id!r} does not match the file name")
        profiles[profile.id] = profile
    return profiles


def aliases() -> dict[str, list[str]]:
    """alias -> ids of the profiles that claim it, smallest usable memory first."""
    table: dict[str, list[DeviceProfile]] = {}
    for profile in builtin_profiles().values():
        for alias in profile.aliases:
            table.setdefault(alias, []).append(profile)
    return {a: [p.id for p in sorted(ps, key=lambda p: (p.memory.usable, p.id))] for a, ps in table.items()}


def resolve_device(name: str) -> ResolvedDevice:
    """Resolve a profile id, a family alias (to its smallest member), ``local`` or a path to a .toml file.

    Raises:
        UnknownDeviceError: when the name matches nothing.
        ProfileError: when a profile file is invalid.
    """
    profiles = builtin_profiles()
    if name in profiles:
        return ResolvedDevice(profiles[name], name, f"profile {name}")
    family = aliases().get(name)
    if family:
        chosen = family[0]
        return ResolvedDevice(profiles[chosen], name,
                              f"{name} resolved to {chosen}, the smallest member of the family (the safe choice); "
                              f"members: {', '.join(family)}")
    if name == LOCAL:
        from edgellm.probe import local_profile   # probing is I/O: only when asked for
        return ResolvedDevice(local_profile(), name, "profile built from this machine's probe")
    if name.endswith(".toml") or Path(name).is_file():
        return ResolvedDevice(load_profile(name), name, f"profile file {name}")
    raise UnknownDeviceError(name=name, known=sorted(set(profiles) | set(aliases())))
