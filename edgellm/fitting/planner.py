"""``plan(facts, profile, options, tables) -> Plan``: size every candidate and pick one. Pure.

For each file type (and KV cache type) the planner finds the largest context that fits the device's
budget, predicts memory, speed and quality, rejects what does not fit or is too slow or too lossy, and
picks the best expected quality; candidates closer to the best than Q8_0's own loss (``TIE_TYPE``, the
type llama.cpp's scoreboard calls practically lossless) count as tied and the faster one wins. Every decision is kept in the Plan with its reason. When nothing qualifies it raises
``NoFitError`` saying what would fit, with numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from edgellm.backends import BACKENDS
from edgellm.errors import NoFitError, UsageError
from edgellm.fitting import memory, speed
from edgellm.fitting.candidates import (AUTO_MIN_CONTEXT, KV_FALLBACKS, MIN_CONTEXT, N_BATCH, SMALL_N_BATCH, SOURCE,
                                    Candidate, contexts, file_types, gguf_backend, threads)
from edgellm.fitting.facts import ModelFacts
from edgellm.fitting.quality import QualityEstimate, expected, prior_kld
from edgellm.fitting.quant import recipe
from edgellm.fitting.tables import Tables
from edgellm.targets.schema import DeviceProfile
from edgellm.units import format_bytes

TIE_TYPE = "Q8_0"           # expected-KLD differences smaller than this type's own loss count as ties
CHOSEN, OK, TOO_BIG, TOO_SLOW, TOO_LOSSY = "chosen", "fits", "too big", "too slow", "too lossy"


@dataclass(frozen=True)
class FitOptions:
    """What the user asked for (the same names as the CLI flags)."""

    context: int | None = None            # tokens; None: the largest affordable
    min_tokens_per_s: float | None = None # decode speed floor (short context)
    max_quality_loss: float | None = None # KLD ceiling
    kv_type: str | None = None            # None: f16, falling back to q8_0/q4_0 only when nothing fits
    measure_quality: bool = False
    file_types: tuple[str, ...] | None = None   # restrict the candidates (Python API)

    def check(self) -> None:
        """Raises UsageError for values no plan can honour."""
        if self.context is not None and self.context < MIN_CONTEXT:
            raise UsageError(problem=f"--context {self.context} is below the smallest context fit plans "
                                     f"({MIN_CONTEXT})", hint_text=f"pass --context {MIN_CONTEXT} or more")
        if self.kv_type is not None and self.kv_type not in memory.KV_TYPES:
            raise UsageError(problem=f"unknown KV cache type {self.kv_type!r}",
                             hint_text=f"use one of {', '.join(memory.KV_TYPES)}")
        for name in ("min_tokens_per_s", "max_quality_loss"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UsageError(problem=f"{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class Evaluated:
    """One candidate, sized: a row of the plan table."""

    candidate: Candidate
    memory: memory.MemoryBreakdown
    speed: speed.SpeedEstimate
    quality: QualityEstimate
    budget_bytes: int                     # host (or unified) memory the profile offers
    device_budget_bytes: int              # dedicated GPU memory (0 without one)
    weights_exact: bool                   # tensor types from llama.cpp's dry run (else the rules table)
    verdict: str = OK
    reason: str = ""

    @property
    def fits(self) -> bool:
        mem = self.memory
        device_ok = mem.device_bytes <= self.device_budget_bytes if self.device_budget_bytes else True
        return (mem.host_bytes if self.device_budget_bytes else mem.total_bytes) <= self.budget_bytes and device_ok

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.candidate.key, "file_type": self.candidate.file_type, "kv_type": self.candidate.kv_type,
                "n_ctx": self.candidate.n_ctx, "n_batch": self.candidate.n_batch, "verdict": self.verdict,
                "reason": self.reason, "weights_exact": self.weights_exact, "budget_bytes": self.budget_bytes,
                "device_budget_bytes": self.device_budget_bytes, "memory": self.memory.to_dict(),
                "speed": self.speed.to_dict(), "quality": self.quality.to_dict()}


@dataclass(frozen=True)
class RuntimePlan:
    """Runtime settings of the chosen candidate (the bundle manifest's ``runtime`` section)."""

    n_ctx: int
    n_threads: int
    n_threads_batch: int
    n_batch: int
    kv_type: str
    n_gpu_layers: int                     # -1: all layers and the output
    mmap: bool
    mlock: bool
    swa_full: bool                        # what the runtime does today; not a manifest key
    flash_attn: bool                      # the runtime's rule: on only for a quantized cache; not a manifest key


@dataclass(frozen=True)
class Plan:
    """Every number and reason behind a fit. ``chosen`` is one of ``rows``."""

    facts: ModelFacts
    profile: DeviceProfile
    device_request: str                   # what the user typed (id, alias, "local", a file)
    device_reason: str                    # how it resolved
    backend: str
    options: FitOptions
    rows: tuple[Evaluated, ...]
    chosen: Evaluated
    runtime: RuntimePlan
    notes: tuple[str, ...] = ()
    tables_source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The plan as data (``--json`` and the bundle manifest's ``plan`` section)."""
        chosen = self.chosen.to_dict()
        return {
            "model": {"name": self.facts.name, "source": self.facts.source, "format": self.facts.source_format,
                      "type": self.facts.source_type, "n_params": self.facts.n_params,
                      "shape": asdict(self.facts.shape) | {"swa_layers": list(self.facts.shape.swa_layers)}},
            "device": {"id": self.profile.id, "requested": self.device_request, "reason": self.device_reason},
            "backend": self.backend, "options": asdict(self.options),
            "chosen": chosen["name"], "file_type": chosen["file_type"],
            "memory": chosen["memory"], "speed": chosen["speed"], "quality": chosen["quality"],
            "budget_bytes": chosen["budget_bytes"], "device_budget_bytes": chosen["device_budget_bytes"],
            "runtime": asdict(self.runtime), "candidates": [r.to_dict() for r in self.rows],
            "notes": list(self.notes), "tables": self.tables_source,
        }


@dataclass(frozen=True)
class _Context:
    """What every evaluation shares."""

    facts: ModelFacts
    profile: DeviceProfile
    tables: Tables
    backend: str
    threads: tuple[int, int]
    budget: int
    device_budget: int


def _discrete_gpu_memory(profile: DeviceProfile, backend: str) -> int:
    if BACKENDS[backend].device != "gpu" or profile.memory.unified:
        return 0
    return max((a.memory or 0 for a in profile.accelerators if a.kind == "gpu"), default=0)


def _placement(ctx: _Context, n_gpu_layers: int) -> memory.Placement:
    return memory.Placement(ctx.backend, ctx.profile.memory.unified or not ctx.device_budget, n_gpu_layers,
                            ctx.facts.shape.n_layers)


def _evaluate(ctx: _Context, cand: Candidate, n_gpu_layers: int) -> Evaluated:
    facts, shape = ctx.facts, ctx.facts.shape
    types, exact = recipe(facts, cand.file_type)
    settings = memory.Settings(n_ctx=cand.n_ctx, n_batch=cand.n_batch, kv_type=cand.kv_type)
    mem = memory.estimate(shape, facts.tensors, types, settings, _placement(ctx, n_gpu_layers),
                          frozenset(ctx.profile.cpu.features))
    spd = speed.estimate(shape, facts.tensors, types, settings, ctx.profile, ctx.backend, ctx.threads[0],
                         ctx.tables.speed, mem.n_gpu_layers)
    source_type = facts.source_type if facts.source_format == "gguf" else None
    quality = expected(cand.key, cand.file_type, cand.kv_type, source_type=source_type, n_params=facts.n_params,
                       measured=facts.measured_kld, priors=ctx.tables.quality)
    return Evaluated(cand, mem, spd, quality, ctx.budget, ctx.device_budget, exact)


def _gpu_layers(ctx: _Context, cand: Candidate) -> int:
    """Layers to offload: all with unified memory or none on the CPU; else the most the GPU holds."""
    n = ctx.facts.shape.n_layers
    if BACKENDS[ctx.backend].device != "gpu":
        return 0
    if not ctx.device_budget:
        return n
    fitting = [k for k in range(n, -1, -1)
               if _evaluate(ctx, cand, k).memory.device_bytes <= ctx.device_budget]
    return fitting[0] if fitting else 0


def _sized(ctx: _Context, cand: Candidate) -> Evaluated:
    return _evaluate(ctx, cand, _gpu_layers(ctx, cand))


def _largest_fitting(ctx: _Context, file_type: str, kv_type: str, ladder: list[int], floor: int) -> Evaluated:
    """The largest context of ``ladder`` that fits (with the runtime's batch, else a smaller one, which only
    slows prefill), else the row at ``floor``."""
    for n_ctx in ladder:
        for n_batch in (N_BATCH, SMALL_N_BATCH):
            row = _sized(ctx, Candidate(file_type, kv_type, n_ctx, n_batch))
            if row.fits:
                return row
    return _sized(ctx, Candidate(file_type, kv_type, max(min(ladder), floor)))


def _rows(ctx: _Context, kinds: list[str], kv_types: tuple[str, ...], ladder: list[int], floor: int) -> list[Evaluated]:
    return [_largest_fitting(ctx, ft, kv, ladder, floor) for kv in kv_types for ft in kinds
            if memory.kv_fits_type(ctx.facts.shape, kv)]


def _judge(row: Evaluated, options: FitOptions, floor: int) -> Evaluated:
    """The verdict of one row against the budget and the user's floors."""
    mem, cand = row.memory, row.candidate
    if row.fits and cand.n_ctx < floor:
        return replace(row, verdict=TOO_BIG, reason=f"fits only up to n_ctx {cand.n_ctx} ({floor} wanted)")
    if not row.fits:
        need = mem.host_bytes if row.device_budget_bytes else mem.total_bytes
        reason = f"needs {format_bytes(need)} at n_ctx {cand.n_ctx}, {format_bytes(row.budget_bytes)} usable"
        if row.device_budget_bytes and mem.device_bytes > row.device_budget_bytes:
            reason = f"GPU part needs {format_bytes(mem.device_bytes)}, {format_bytes(row.device_budget_bytes)} on the GPU"
        return replace(row, verdict=TOO_BIG, reason=reason)
    if options.min_tokens_per_s is not None and row.speed.decode_tokens_per_s < options.min_tokens_per_s:
        return replace(row, verdict=TOO_SLOW, reason=f"{row.speed.decode_tokens_per_s:.1f} tok/s < "
                                                     f"{options.min_tokens_per_s:g} asked")
    if options.max_quality_loss is not None and row.quality.kld > options.max_quality_loss:
        return replace(row, verdict=TOO_LOSSY, reason=f"KLD {row.quality.kld:.4f} > {options.max_quality_loss:g} asked")
    return replace(row, verdict=OK, reason=f"fits with {format_bytes(row.budget_bytes - _need(row))} to spare")


def _need(row: Evaluated) -> int:
    return row.memory.host_bytes if row.device_budget_bytes else row.memory.total_bytes


def tie_kld(facts: ModelFacts, tables: Tables) -> float:
    """The expected-KLD difference below which two candidates count as equally good."""
    return prior_kld(TIE_TYPE, facts.n_params, tables.quality) or 0.0


def choose(rows: list[Evaluated], tie: float) -> Evaluated | None:
    """Best expected quality; within ``tie`` of it the fastest wins (then the smaller)."""
    ok = [r for r in rows if r.verdict == OK]
    if not ok:
        return None
    best = min(r.quality.kld for r in ok)
    tied = [r for r in ok if r.quality.kld <= best + tie]
    return max(tied, key=lambda r: (r.speed.decode_tokens_per_s, -r.memory.total_bytes))


def _mark(rows: list[Evaluated], chosen: Evaluated, tie: float, source_type: str) -> list[Evaluated]:
    name = chosen.candidate.key.replace(SOURCE, f"{source_type} as is", 1)
    out = []
    for r in rows:
        if r is chosen:
            out.append(replace(r, verdict=CHOSEN, reason=r.reason + "; best expected quality"
                               + (" (ties go to the faster)" if len(rows) > 1 else "")))
        elif r.verdict == OK:
            why = ("lower expected quality" if r.quality.kld > chosen.quality.kld + tie
                   else "as good but slower")
            out.append(replace(r, reason=f"{r.reason}; {why} than {name}"))
        else:
            out.append(r)
    return out


def _runtime(ctx: _Context, chosen: Evaluated) -> RuntimePlan:
    cand, gpu = chosen.candidate, chosen.memory.n_gpu_layers
    copied = memory.BACKENDS[ctx.backend].weights_copied and gpu > 0
    all_layers = gpu >= ctx.facts.shape.n_layers and gpu > 0
    return RuntimePlan(n_ctx=cand.n_ctx, n_threads=ctx.threads[0], n_threads_batch=ctx.threads[1],
                       n_batch=cand.n_batch, kv_type=cand.kv_type, n_gpu_layers=-1 if all_layers else gpu,
                       mmap=not copied, mlock=False, swa_full=False,
                       flash_attn=memory.Settings(n_ctx=cand.n_ctx, kv_type=cand.kv_type).uses_flash_attn)


def _notes(ctx: _Context, chosen: Evaluated, extra: list[str]) -> tuple[str, ...]:
    notes = list(ctx.facts.notes) + extra + list(chosen.memory.notes)
    if chosen.candidate.n_batch != N_BATCH:
        notes.append(f"n_batch {chosen.candidate.n_batch} instead of {N_BATCH}: a smaller compute buffer makes it fit, "
                     "prompts are processed more slowly")
    if not chosen.weights_exact:
        notes.append(f"{chosen.candidate.file_type} weights sized with edgellm's copy of llama.cpp's type rules "
                     "(no dry run of llama.cpp's quantizer was available)")
    if ctx.facts.shape.n_swa_layers:
        cells = memory.swa_cells(ctx.facts.shape, memory.Settings(n_ctx=chosen.candidate.n_ctx,
                                                                  n_batch=chosen.candidate.n_batch))
        notes.append(f"{ctx.facts.shape.n_swa_layers} of {ctx.facts.shape.n_layers} layers slide over a "
                     f"{ctx.facts.shape.sliding_window}-token window: their caches hold {cells} cells, not "
                     f"{chosen.candidate.n_ctx}")
    if chosen.memory.n_gpu_layers and not (chosen.memory.n_gpu_layers >= ctx.facts.shape.n_layers):
        notes.append(f"{chosen.memory.n_gpu_layers} of {ctx.facts.shape.n_layers} layers fit on the GPU; "
                     "the rest run on the CPU")
    return tuple(notes)


def plan(facts: ModelFacts, profile: DeviceProfile, options: FitOptions, tables: Tables, *,
         device_request: str = "", device_reason: str = "") -> Plan:
    """Size every candidate for ``profile`` and choose one.

    Raises:
        UsageError: options no plan can honour.
        NoFitError: no candidate fits, is fast enough and good enough; the message says what would.
    """
    options.check()
    backend = gguf_backend(profile)
    ctx = _Context(facts, profile, tables, backend, threads(profile), profile.memory.usable,
                   _discrete_gpu_memory(profile, backend))
    kinds, notes = file_types(facts, options.file_types)
    ladder = contexts(options.context, facts.shape.context_length)
    floor = options.context or min(AUTO_MIN_CONTEXT, facts.shape.context_length)
    kv_types = (options.kv_type,) if options.kv_type else ("f16",)
    rows = [_judge(r, options, floor) for r in _rows(ctx, kinds, kv_types, ladder, floor)]
    if not any(r.verdict == OK for r in rows) and not options.kv_type:
        fallback = [_judge(r, options, floor) for r in _rows(ctx, kinds, KV_FALLBACKS, ladder, floor)]
        if any(r.verdict == OK for r in fallback):
            notes.append("nothing fits with an f16 KV cache: quantized caches were tried")
        rows += fallback
    if not any(r.verdict == OK for r in rows) and options.context is None and floor > MIN_CONTEXT:
        notes.append(f"nothing fits at {floor} tokens of context: smaller contexts were tried")
        rows = [_judge(_largest_fitting(ctx, r.candidate.file_type, r.candidate.kv_type, ladder, MIN_CONTEXT),
                       options, MIN_CONTEXT) for r in rows]
    tie = tie_kld(facts, tables)
    chosen = choose(rows, tie)
    if chosen is None:
        raise _no_fit(ctx, rows, options, floor)
    rows = _mark(rows, chosen, tie, facts.source_type)
    chosen = next(r for r in rows if r.verdict == CHOSEN)
    return Plan(facts=facts, profile=profile, device_request=device_request or profile.id,
                device_reason=device_reason, backend=backend, options=options, rows=tuple(rows), chosen=chosen,
                runtime=_runtime(ctx, chosen), notes=_notes(ctx, chosen, notes), tables_source=tables.speed.source)


# ------------------------------------------------------------------------------------------- no fit

def _no_fit(ctx: _Context, rows: list[Evaluated], options: FitOptions, floor: int) -> NoFitError:
    device = f"{ctx.profile.id} ({format_bytes(ctx.budget)} usable)"
    too_big = [r for r in rows if r.verdict == TOO_BIG]
    if len(too_big) == len(rows):
        smallest = min(rows, key=_need)
        problem = (f"the smallest candidate, {smallest.candidate.key} at n_ctx {smallest.candidate.n_ctx}, needs "
                   f"{format_bytes(_need(smallest))} (weights {format_bytes(smallest.memory.weights_bytes)}, KV cache "
                   f"{format_bytes(smallest.memory.kv_cache_bytes)})")
        return NoFitError(model=ctx.facts.name, device=device, problem=problem,
                          suggestions=memory_suggestions(ctx, smallest, options))
    fitting = [r for r in rows if r.verdict != TOO_BIG]
    if options.min_tokens_per_s is not None and all(r.verdict == TOO_SLOW for r in fitting):
        fastest = max(fitting, key=lambda r: r.speed.decode_tokens_per_s)
        return NoFitError(model=ctx.facts.name, device=device,
                          problem=f"nothing that fits reaches {options.min_tokens_per_s:g} tok/s",
                          suggestions=[f"--min-tokens-per-s {fastest.speed.decode_tokens_per_s:.1f} "
                                       f"({fastest.candidate.key} is the fastest that fits)",
                                       "a smaller model"])
    best = min(fitting, key=lambda r: r.quality.kld)
    return NoFitError(model=ctx.facts.name, device=device,
                      problem=f"nothing that fits is within KLD {options.max_quality_loss:g}"
                              + (f" at {options.min_tokens_per_s:g} tok/s" if options.min_tokens_per_s else ""),
                      suggestions=[f"--max-quality-loss {best.quality.kld:.4f} ({best.candidate.key} is the best "
                                   f"that fits)", "--measure-quality (priors are conservative for small models)"])


def memory_suggestions(ctx: _Context, smallest: Evaluated, options: FitOptions) -> list[str]:
    """What would fit, with numbers: a smaller context, a quantized KV cache, a smaller model."""
    cand, out = smallest.candidate, []
    for n_ctx in contexts(None, min(cand.n_ctx, ctx.facts.shape.context_length)):
        row = _sized(ctx, replace(cand, n_ctx=n_ctx))
        if n_ctx < cand.n_ctx and row.fits:
            out.append(f"--context {n_ctx} ({cand.key} needs {format_bytes(_need(row))})")
            break
    for kv in KV_FALLBACKS:
        if kv != cand.kv_type and memory.kv_fits_type(ctx.facts.shape, kv):
            row = _sized(ctx, replace(cand, kv_type=kv))
            if row.fits:
                out.append(f"--kv-type {kv} ({cand.file_type} at n_ctx {cand.n_ctx} needs {format_bytes(_need(row))})")
                break
    spare = ctx.budget - (_need(smallest) - smallest.memory.weights_bytes)
    bytes_per_param = smallest.memory.weights_bytes / max(ctx.facts.n_params, 1)
    if spare > 0:
        out.append(f"a smaller model: about {spare / bytes_per_param / 1e6:.0f}M parameters at {cand.file_type} "
                   f"and n_ctx {cand.n_ctx}")
    else:
        out.append(f"a device with more than {format_bytes(_need(smallest))} usable")
    return out
