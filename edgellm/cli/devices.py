"""``edgellm devices``: list the built-in device profiles, or show one profile in full.

    edgellm devices [--json]                 table of every built-in profile
    edgellm devices show NAME [--json]       every field of one profile, with units, and its sources

NAME is a profile id, a family alias (resolved to its smallest member), ``local`` (this machine's probe) or a
path to a profile .toml file; all of them go through ``edgellm.targets.resolve_device``.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from typing import Any, Iterator

from edgellm.cli import output
from edgellm.targets import DeviceProfile, Source, builtin_profiles, resolve_device

# Human units per unit kind of the schema: (prefix table, unit suffix). Memory sizes are shown in binary
# prefixes (RAM comes in powers of two), rates and clocks in decimal ones (datasheets use them); either way
# the text parses back with edgellm.units.
_PREFIXES = {
    "binary": (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)),
    "decimal": (("T", 10**12), ("G", 10**9), ("M", 10**6), ("K", 10**3)),
}
_UNITS = {
    "bytes": ("binary", "B"),
    "bandwidth": ("decimal", "B/s"),
    "frequency": ("decimal", "Hz"),
    "ops": ("decimal", "OPS"),
    "power": ("decimal", "W"),
}
_TABLE_HEADERS = ("ID", "CLASS", "MEMORY USABLE/TOTAL", "BANDWIDTH", "FIRST BACKEND", "ALIASES")
_WRAP = 100   # wrap width of notes and source titles in `devices show`


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``devices`` (and its ``show`` subcommand) to the top-level parser."""
    parser = subparsers.add_parser("devices", help="list device profiles, or show one in full",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print data (base units: bytes, bytes/s, Hz) as JSON")
    parser.set_defaults(run=run, name=None)
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    show = sub.add_parser("show", help="show every field of one profile and its sources")
    show.add_argument("name", metavar="NAME", help="profile id, family alias, `local`, or a profile .toml file")
    # SUPPRESS: `devices --json show X` and `devices show X --json` both work without one default hiding the other.
    show.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the profile as JSON")


def run(args: argparse.Namespace) -> int:
    """List profiles, or show the one named by ``args.name``; library errors propagate to the CLI shell."""
    if args.name is None:
        profiles = list(builtin_profiles().values())
        if args.json:
            output.print_json([profile_row(p) for p in profiles])
        else:
            print(output.table(_TABLE_HEADERS, (table_cells(p) for p in profiles)))
        return 0
    resolved = resolve_device(args.name)
    if resolved.profile.id != args.name:     # an alias, `local` or a file: say what was picked and why
        output.note(resolved.reason)
    if args.json:
        output.print_json(resolved.profile.to_dict())
    else:
        print(describe(resolved.profile))
    return 0


def human(value: float, kind: str) -> str:
    """Return a quantity in base units as short text with a unit: (8 * 2**30, "bytes") -> "8 GiB",
    (68e9, "bandwidth") -> "68 GB/s". ``edgellm.units.parse`` reads it back, rounded to three decimals."""
    family, suffix = _UNITS[kind]
    for prefix, scale in _PREFIXES[family]:
        if abs(value) >= scale:
            return f"{_number(value / scale)} {prefix}{suffix}"
    return f"{_number(value)} {suffix}"


def _number(x: float) -> str:
    """Up to three decimals, no trailing zeros: 2.0 -> "2", 1.51040 -> "1.51", 17.0675 -> "17.068"."""
    text = f"{x:.3f}".rstrip("0").rstrip(".")
    return text or "0"


def profile_row(profile: DeviceProfile) -> dict[str, Any]:
    """The data behind one row of the listing (base units), as ``devices --json`` prints it."""
    return {
        "id": profile.id,
        "name": profile.name,
        "device_class": profile.device_class,
        "memory": {"usable": profile.memory.usable, "total": profile.memory.total,
                   "bandwidth": profile.memory.bandwidth},
        "first_backend": profile.backends[0],
        "aliases": list(profile.aliases),
    }


def table_cells(profile: DeviceProfile) -> tuple[str, ...]:
    """One row of the ``devices`` table, in human units."""
    memory = profile.memory
    return (profile.id, profile.device_class, f"{human(memory.usable, 'bytes')} / {human(memory.total, 'bytes')}",
            human(memory.bandwidth, "bandwidth"), profile.backends[0], ", ".join(profile.aliases) or "-")


def fields(obj: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Yield (dotted key, human value) for every field of a profile dataclass, recursing into tables and lists
    of tables (``cpu.clusters[0].max_clock``). Unset optional figures are skipped; ``sources`` and ``notes`` are
    left to ``describe``, which prints them as their own sections."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if f.name in ("sources", "notes") and not prefix:
            continue
        if value is None or value == "":
            continue
        if dataclasses.is_dataclass(value):
            yield from fields(value, key + ".")
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                yield from fields(item, f"{key}[{i}].")
        elif isinstance(value, tuple):
            yield key, ", ".join(map(str, value)) or "-"
        elif "unit" in f.metadata:
            yield key, human(value, f.metadata["unit"])
        elif isinstance(value, bool):
            yield key, "yes" if value else "no"
        else:
            yield key, str(value)


def _wrap(text: str, first: str, rest: str) -> list[str]:
    return textwrap.wrap(text, _WRAP, initial_indent=first, subsequent_indent=rest) or [first.rstrip()]


def _source_lines(number: int, source: Source) -> list[str]:
    lines = _wrap(source.title, f"  [{number}] ", "      ")
    if source.url:
        lines.append(f"      {source.url}")
    lines.append(f"      backs: {', '.join(source.figures)}")
    return lines


def describe(profile: DeviceProfile) -> str:
    """The full human-readable form of a profile: every field, the notes, then the sources."""
    pairs = list(fields(profile))
    width = max(len(key) for key, _ in pairs)
    lines = [f"{key:<{width}}  {value}" for key, value in pairs]
    if profile.notes:
        lines += ["", "notes:"]
        for paragraph in profile.notes.splitlines():
            lines += _wrap(paragraph, "  ", "    ")
    lines += ["", "sources:"]
    for number, source in enumerate(profile.sources, start=1):
        lines += _source_lines(number, source)
    return "\n".join(lines)
