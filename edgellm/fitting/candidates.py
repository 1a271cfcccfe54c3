"""What the planner tries: file types, contexts, KV cache types, the backend and threads. Pure.

A 16-bit checkpoint can become any file type llama.cpp quantizes to without an importance matrix. A GGUF
is only ever requantized downward (to types with fewer bits in their main tensors than the source's, and
smaller on disk) or kept as it is ("SOURCE"): requantizing cannot restore what the source already lost.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgellm.backends import BACKENDS
from edgellm.converters.quant_types import FILE_TYPES
from edgellm.fitting.facts import ModelFacts, block_layout
from edgellm.fitting.quant import recipe, weight_bytes
from edgellm.targets.schema import DeviceProfile

# File types worth offering, best quality first. No IQ2/IQ1/IQ3_XXS (they need an importance matrix) and
# no legacy Q4_1/Q5_x (a K-quant of the same size is better, quality_priors.toml).
FILE_TYPE_LADDER = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "IQ4_XS", "Q4_0", "Q3_K_L",
                    "Q3_K_M", "Q3_K_S", "Q2_K")
SOURCE = "SOURCE"                   # keep a GGUF's tensors as they are

KV_FALLBACKS = ("q8_0", "q4_0")     # tried, in order, when nothing fits with an f16 cache
MIN_CONTEXT = 512                   # smallest context the planner offers
AUTO_MIN_CONTEXT = 2048             # without --context, a plan must afford at least this (or the model's maximum)
AUTO_MAX_CONTEXT = 32768            # ... and is given the largest power of two up to this that fits
N_BATCH = 512                       # the runtime's llama_decode batch (edgellm.runtime.llamacpp.DEFAULT_N_BATCH)
SMALL_N_BATCH = 128                 # tried when a candidate misses its budget by less than the compute it saves
BIG_CORE_CLOCK_SHARE = 0.8          # decode threads: cores clocked within 80% of the fastest cluster


@dataclass(frozen=True)
class Candidate:
    """One configuration to size: a file type with a KV cache type, context and batch."""

    file_type: str                  # llama.cpp file type, SOURCE, or MIXED (mixed.py)
    kv_type: str = "f16"
    n_ctx: int = 4096
    n_batch: int = N_BATCH
    weights_budget: int = 0         # MIXED: tensor bytes the allocator may fill (0 otherwise)
    label: str = ""                 # MIXED: its name ("MIXED@4.53bpw"); pruned: "Q8_0-PRUNE2"
    prune: tuple[int, ...] = ()     # blocks dropped (original indices), --allow-prune only

    @property
    def name(self) -> str:
        """The weights' name: the file type, or a mixed candidate's label."""
        return self.label or self.file_type

    @property
    def key(self) -> str:
        """Name in tables and in ``ModelFacts.measured_kld`` (weights' name, plus a non-default KV type)."""
        return self.name + ("" if self.kv_type == "f16" else f"+kv:{self.kv_type}")


def source_main_bits(facts: ModelFacts) -> float:
    """Bits per weight of the source's main type: its file type's (general.file_type), else the type that
    holds most of the layer matrices' weights."""
    if facts.source_type in FILE_TYPES:
        return FILE_TYPES[facts.source_type].nominal_bits_per_weight
    counts: dict[str, int] = {}
    for t in facts.tensors:
        if len(t.ne) >= 2 and t.layer is not None:
            counts[t.type] = counts.get(t.type, 0) + t.n_elements
    block, size = block_layout(max(counts, key=counts.__getitem__))
    return 8 * size / block


def file_types(facts: ModelFacts, wanted: tuple[str, ...] | None = None) -> tuple[list[str], list[str]]:
    """(file types to try, notes on what was left out and why)."""
    ladder = list(wanted or FILE_TYPE_LADDER)
    if facts.source_format != "gguf":
        return ladder, []
    bits = source_main_bits(facts)
    source = weight_bytes(facts.tensors, {t.name: t.type for t in facts.tensors})
    kept = [ft for ft in ladder if FILE_TYPES[ft].nominal_bits_per_weight < bits
            and weight_bytes(facts.tensors, recipe(facts, ft)[0]) < source]
    skipped = [ft for ft in ladder if ft not in kept]
    note = (f"the source is a {facts.source_type} GGUF ({bits:.2f} bits per weight in its main tensors): it is "
            f"used as it is or requantized only downward; not offered: {', '.join(skipped)}")
    return [SOURCE] + kept, [note] if skipped else []


def contexts(requested: int | None, trained: int) -> list[int]:
    """Contexts to try, largest first: the requested one, or powers of two up to the automatic maximum."""
    if requested is not None:
        return [requested]
    top = min(trained, AUTO_MAX_CONTEXT)
    ladder, n = [], MIN_CONTEXT
    while n < top:
        ladder.append(n)
        n *= 2
    return sorted(set(ladder + [top]), reverse=True)


def gguf_backend(profile: DeviceProfile) -> str:
    """The profile's preferred llama.cpp backend (GGUF is what fit writes). Raises KeyError if it has none."""
    return next(b for b in profile.backends if BACKENDS[b].format == "gguf")


def threads(profile: DeviceProfile) -> tuple[int, int]:
    """(decode threads, batch threads): the big cores decode (more threads stop helping once memory is the
    limit, and little cores slow the whole step), every core prefills."""
    clusters = profile.cpu.clusters
    fastest = max((c.max_clock for c in clusters), default=0.0)
    big = sum(c.cores for c in clusters if fastest == 0 or c.max_clock >= BIG_CORE_CLOCK_SHARE * fastest)
    return max(big, 1), max(profile.cpu.cores, 1)
