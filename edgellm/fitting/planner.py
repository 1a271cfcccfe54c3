"""``plan(facts, profile, options, tables) -> Plan``: size every candidate and pick one. Pure.

Candidates: llama.cpp file types, mixed-precision budgets for the converter's allocator (``mixed.py``, 16-bit
sources), ONNX types when ONNX is planned (``onnx_plan.py``; ``--format``, or the profile's first backend),
and measured layer-pruned models with ``--allow-prune`` (``prune.py``). For each (and each KV cache type) the
planner finds the largest context that fits the device's budget, predicts memory, speed and quality, rejects
what does not fit or is too slow or too lossy, and picks the best expected quality; candidates closer to the
best than Q8_0's own loss (``TIE_TYPE``, the type llama.cpp's scoreboard calls practically lossless) count as
tied and the faster one wins. Every decision is kept in the Plan with its reason. When nothing qualifies it
raises ``NoFitError`` saying what would fit, with numbers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from edgellm.backends import BACKENDS
from edgellm.errors import NoFitError, UsageError
from edgellm.fitting import memory, mixed, onnx_plan, prune, speed
from edgellm.fitting.candidates import (AUTO_MIN_CONTEXT, FILE_TYPE_LADDER, KV_FALLBACKS, MIN_CONTEXT, N_BATCH,
                                    SMALL_N_BATCH, SOURCE, Candidate, contexts, file_types, gguf_backend, threads)
from edgellm.fitting.facts import ModelFacts
from edgellm.fitting.quality import QualityEstimate, expected, prior_kld
from edgellm.fitting.quant import Recipe, recipe
from edgellm.fitting.tables import Tables
from edgellm.targets.schema import DeviceProfile
from edgellm.units import format_bytes

FORMATS = ("auto", "gguf", "onnx", "both")
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
    format: str = "auto"                  # "gguf", "onnx", "both"; auto: ONNX when the profile's first backend is
    allow_prune: bool = False             # offer measured layer-pruned candidates (facts.prunings)

    def check(self) -> None:
        """Raises UsageError for values no plan can honour."""
        if self.context is not None and self.context < MIN_CONTEXT:
            raise UsageError(problem=f"--context {self.context} is below the smallest context fit plans "
                                     f"({MIN_CONTEXT})", hint_text=f"pass --context {MIN_CONTEXT} or more")
        if self.kv_type is not None and self.kv_type not in memory.KV_TYPES:
            raise UsageError(problem=f"unknown KV cache type {self.kv_type!r}",
                             hint_text=f"use one of {', '.join(memory.KV_TYPES)}")
        if self.format not in FORMATS:
            raise UsageError(problem=f"unknown format {self.format!r}", hint_text=f"use one of {', '.join(FORMATS)}")
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
    backend: str = ""                     # the backend this row runs on (GGUF and ONNX rows differ)

    @property
    def fits(self) -> bool:
        mem = self.memory
        device_ok = mem.device_bytes <= self.device_budget_bytes if self.device_budget_bytes else True
        return (mem.host_bytes if self.device_budget_bytes else mem.total_bytes) <= self.budget_bytes and device_ok

    def to_dict(self) -> dict[str, Any]:
        mixed = {"weights_budget_bytes": self.candidate.weights_budget} if self.candidate.weights_budget else {}
        return {"name": self.candidate.key, "file_type": self.candidate.file_type, **mixed,
                "format": "onnx" if onnx_plan.is_onnx(self.candidate.file_type) else "gguf", "backend": self.backend,
                "kv_type": self.candidate.kv_type,
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
    provider: str | None = None           # ONNX Runtime execution provider (ONNX bundles only)


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
    calibration: dict[str, Any] | None = None   # the speed calibration used (``Calibration.to_dict``), if any

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
            "notes": list(self.notes), "tables": self.tables_source, "calibration": self.calibration,
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
    onnx_backend: str | None = None       # the profile's ONNX Runtime backend, when ONNX candidates are planned
    mixed: Mapping[str, Recipe] = field(default_factory=dict)   # MIXED label -> the type mix sized for it
    mixed_prior: Mapping[str, tuple[float, str]] = field(default_factory=dict)   # label -> (KLD, note)


def _discrete_gpu_memory(profile: DeviceProfile, backend: str) -> int:
    if BACKENDS[backend].device != "gpu" or profile.memory.unified:
        return 0
    return max((a.memory or 0 for a in profile.accelerators if a.kind == "gpu"), default=0)


def _placement(ctx: _Context, n_gpu_layers: int) -> memory.Placement:
    return memory.Placement(ctx.backend, ctx.profile.memory.unified or not ctx.device_budget, n_gpu_layers,
                            ctx.facts.shape.n_layers)


def _evaluate_onnx(ctx: _Context, cand: Candidate) -> Evaluated:
    """An ONNX candidate: the converter's exact file bytes, ONNX Runtime's measured overhead, its KV cache."""
    facts, backend = ctx.facts, ctx.onnx_backend
    ch = onnx_plan.choices(onnx_plan.onnx_type(cand.file_type), backend, cand.n_ctx, facts.shape.context_length)
    row, note = onnx_plan.memory_row(ctx.tables.onnx_memory, backend)
    mem = onnx_plan.breakdown(facts, ch, cand.n_ctx, row, tuple(ch.notes) + ((note,) if note else ()))
    spd = onnx_plan.estimate_speed(facts, ch, cand.n_ctx, ctx.profile, backend, ctx.threads[0], ctx.tables.speed)
    quality = expected(cand.key, cand.file_type, cand.kv_type, source_type=None, n_params=facts.n_params,
                       measured=facts.measured_kld, priors=ctx.tables.quality)
    exact = ch.provider.matmul_nbits or ch.precision.bits is None    # DequantizeLinear layouts are approximated
    return Evaluated(cand, mem, spd, quality, ctx.budget, 0, exact, backend=backend)


def _pruned_quality(ctx: _Context, cand: Candidate, facts: ModelFacts) -> QualityEstimate:
    """Measured pruning loss plus the file type's (and KV cache's) prior: never a prior alone."""
    pruning = next(p for p in ctx.facts.prunings if p.drop == cand.prune)
    quant = prior_kld(cand.file_type, facts.n_params, ctx.tables.quality) or 0.0
    kv = ctx.tables.quality.kv_kld.get(cand.kv_type, 0.0)
    return QualityEstimate(pruning.kld + quant + kv, "measured",
                           f"pruning blocks {', '.join(map(str, cand.prune))} measured KLD {pruning.kld:.4f} on "
                           f"edgellm/data/eval.txt (16-bit), plus the {cand.file_type} prior {quant:.4f}"
                           + (f" and the {cand.kv_type} cache prior {kv:.4f}" if kv else ""))


def _evaluate(ctx: _Context, cand: Candidate, n_gpu_layers: int) -> Evaluated:
    if onnx_plan.is_onnx(cand.file_type):
        return _evaluate_onnx(ctx, cand)
    facts = prune.drop_layers(ctx.facts, cand.prune) if cand.prune else ctx.facts
    shape = facts.shape
    if cand.file_type == mixed.MIXED:     # exact once the measured allocation is known (--measure-quality)
        exact = cand.label in facts.recipes
        types = dict(facts.recipes[cand.label]) if exact else ctx.mixed[cand.label]
    else:
        types, exact = recipe(facts, cand.file_type)
    settings = memory.Settings(n_ctx=cand.n_ctx, n_batch=cand.n_batch, kv_type=cand.kv_type)
    mem = memory.estimate(shape, facts.tensors, types, settings, _placement(ctx, n_gpu_layers),
                          frozenset(ctx.profile.cpu.features))
    spd = speed.estimate(shape, facts.tensors, types, settings, ctx.profile, ctx.backend, ctx.threads[0],
                         ctx.tables.speed, mem.n_gpu_layers)
    source_type = facts.source_type if facts.source_format == "gguf" else None
    quality = _pruned_quality(ctx, cand, facts) if cand.prune else expected(
        cand.key, cand.file_type, cand.kv_type, source_type=source_type, n_params=facts.n_params,
        measured=facts.measured_kld, priors=ctx.tables.quality, predicted=facts.predicted_kld,
        prior=ctx.mixed_prior.get(cand.label))
    return Evaluated(cand, mem, spd, quality, ctx.budget, ctx.device_budget, exact, backend=ctx.backend)


def _gpu_layers(ctx: _Context, cand: Candidate) -> int:
    """Layers to offload: all with unified memory or none on the CPU; else the most the GPU holds."""
    n = ctx.facts.shape.n_layers
    if BACKENDS[ctx.backend].device != "gpu" or onnx_plan.is_onnx(cand.file_type):
        return 0
    if not ctx.device_budget:
        return n
    fitting = [k for k in range(n, -1, -1)
               if _evaluate(ctx, cand, k).memory.device_bytes <= ctx.device_budget]
    return fitting[0] if fitting else 0


def _sized(ctx: _Context, cand: Candidate) -> Evaluated:
    return _evaluate(ctx, cand, _gpu_layers(ctx, cand))


def _largest_fitting(ctx: _Context, base: Candidate, ladder: list[int], floor: int) -> Evaluated:
    """The largest context of ``ladder`` that fits ``base`` (with the runtime's batch, else a smaller one,
    which only slows prefill), else the row at ``floor``."""
    for n_ctx in ladder:
        for n_batch in (N_BATCH, SMALL_N_BATCH):
            row = _sized(ctx, replace(base, n_ctx=n_ctx, n_batch=n_batch))
            if row.fits:
                return row
    return _sized(ctx, replace(base, n_ctx=max(min(ladder), floor), n_batch=N_BATCH))


def _rows(ctx: _Context, bases: list[Candidate], kv_types: tuple[str, ...], ladder: list[int],
          floor: int) -> list[Evaluated]:
    return [_largest_fitting(ctx, replace(base, kv_type=kv), ladder, floor) for kv in kv_types for base in bases
            if memory.kv_fits_type(ctx.facts.shape, kv) and (kv == "f16" or not onnx_plan.is_onnx(base.file_type))]


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
    if onnx_plan.is_onnx(cand.file_type):     # the provider runs the whole graph; weights are memory-mapped
        return RuntimePlan(n_ctx=cand.n_ctx, n_threads=ctx.threads[0], n_threads_batch=ctx.threads[1],
                           n_batch=cand.n_batch, kv_type=cand.kv_type, n_gpu_layers=0, mmap=True, mlock=False,
                           swa_full=True, flash_attn=False, provider=BACKENDS[chosen.backend].api)
    copied = memory.BACKENDS[ctx.backend].weights_copied and gpu > 0
    all_layers = gpu >= ctx.facts.shape.n_layers and gpu > 0
    return RuntimePlan(n_ctx=cand.n_ctx, n_threads=ctx.threads[0], n_threads_batch=ctx.threads[1],
                       n_batch=cand.n_batch, kv_type=cand.kv_type, n_gpu_layers=-1 if all_layers else gpu,
                       mmap=not copied, mlock=False, swa_full=False,
                       flash_attn=memory.Settings(n_ctx=cand.n_ctx, kv_type=cand.kv_type).uses_flash_attn)


def _inexact_note(cand: Candidate) -> str:
    if cand.file_type == mixed.MIXED:
        return (f"{cand.label} sized with a prior type mix of {cand.weights_budget} bytes: the allocator picks each "
                "tensor's type from measured sensitivity when the bundle is built (--measure-quality does it now)")
    if onnx_plan.is_onnx(cand.file_type):
        return f"{cand.file_type}: standard-op (DequantizeLinear) weight layout sized like MatMulNBits blocks"
    return (f"{cand.file_type} weights sized with edgellm's copy of llama.cpp's type rules "
            "(no dry run of llama.cpp's quantizer was available)")


def _notes(ctx: _Context, chosen: Evaluated, extra: list[str]) -> tuple[str, ...]:
    notes = list(ctx.facts.notes) + extra + list(chosen.memory.notes)
    if chosen.candidate.n_batch != N_BATCH:
        notes.append(f"n_batch {chosen.candidate.n_batch} instead of {N_BATCH}: a smaller compute buffer makes it fit, "
                     "prompts are processed more slowly")
    if not chosen.weights_exact:
        notes.append(_inexact_note(chosen.candidate))
    if ctx.facts.shape.n_swa_layers and not onnx_plan.is_onnx(chosen.candidate.file_type):
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
    wanted, format_notes = _formats(options.format, profile, facts)
    backend = gguf_backend(profile) if "gguf" in wanted else onnx_plan.onnx_backend(profile)
    ctx = _Context(facts, profile, tables, backend, threads(profile), profile.memory.usable,
                   _discrete_gpu_memory(profile, backend) if "gguf" in wanted else 0,
                   onnx_backend=onnx_plan.onnx_backend(profile) if "onnx" in wanted else None)
    ladder = contexts(options.context, facts.shape.context_length)
    floor = options.context or min(AUTO_MIN_CONTEXT, facts.shape.context_length)
    ctx, kinds, notes = _bases(ctx, options, floor, wanted)
    notes = format_notes + notes
    kv_types = (options.kv_type,) if options.kv_type else ("f16",)
    rows = [_judge(r, options, floor) for r in _rows(ctx, kinds, kv_types, ladder, floor)]
    if not any(r.verdict == OK for r in rows) and not options.kv_type:
        fallback = [_judge(r, options, floor) for r in _rows(ctx, kinds, KV_FALLBACKS, ladder, floor)]
        if any(r.verdict == OK for r in fallback):
            notes.append("nothing fits with an f16 KV cache: quantized caches were tried")
        rows += fallback
    if not any(r.verdict == OK for r in rows) and options.context is None and floor > MIN_CONTEXT:
        notes.append(f"nothing fits at {floor} tokens of context: smaller contexts were tried")
        rows = [_judge(_largest_fitting(ctx, r.candidate, ladder, MIN_CONTEXT),
                       options, MIN_CONTEXT) for r in rows]
    tie = tie_kld(facts, tables)
    chosen = choose(rows, tie)
    if chosen is None:
        raise _no_fit(ctx, rows, options, floor)
    rows = _mark(rows, chosen, tie, facts.source_type)
    chosen = next(r for r in rows if r.verdict == CHOSEN)
    return Plan(facts=facts, profile=profile, device_request=device_request or profile.id,
                device_reason=device_reason, backend=chosen.backend, options=options, rows=tuple(rows), chosen=chosen,
                runtime=_runtime(ctx, chosen), notes=_notes(ctx, chosen, notes), tables_source=tables.speed.source,
                calibration=tables.calibration.to_dict() if tables.calibration else None)


# ------------------------------------------------------------------------------------------- candidates

def _formats(option: str, profile: DeviceProfile, facts: ModelFacts) -> tuple[tuple[str, ...], list[str]]:
    """(formats to plan, notes): ``auto`` is ONNX when the profile's first backend is an ONNX Runtime provider
    (and the source a checkpoint, which the ONNX converter needs), else GGUF.

    Raises UsageError for a format the profile or the source cannot take."""
    if option == "auto":
        if not onnx_plan.prefers_onnx(profile):
            return ("gguf",), []
        if facts.source_format == "hf":
            return ("onnx",), [f"ONNX: {profile.id}'s first backend is {profile.backends[0]}"]
        return ("gguf",), [f"{profile.id} prefers {profile.backends[0]}, but a GGUF source converts only to GGUF"]
    wanted = ("gguf", "onnx") if option == "both" else (option,)
    if "onnx" in wanted and facts.source_format != "hf":
        raise UsageError(problem="ONNX output needs a Hugging Face checkpoint, not a GGUF file",
                         hint_text="pass the checkpoint folder, or --format gguf")
    if "onnx" in wanted and onnx_plan.onnx_backend(profile) is None:
        raise UsageError(problem=f"{profile.id} lists no ONNX Runtime backend", hint_text="use --format gguf")
    if "gguf" in wanted and not any(BACKENDS[b].format == "gguf" for b in profile.backends):
        raise UsageError(problem=f"{profile.id} lists no llama.cpp backend", hint_text="use --format onnx")
    return wanted, []


def _bases(ctx: _Context, options: FitOptions, floor: int,
           formats: tuple[str, ...] = ("gguf",)) -> tuple[_Context, list[Candidate], list[str]]:
    """(context with the mixed recipes, the candidates to size, notes): the stock file types asked for (all
    by default) and, for a 16-bit source, the mixed-precision budgets (``mixed.py``); ONNX types for the
    profile's ONNX Runtime backend when ONNX is planned."""
    onnx = [Candidate(onnx_plan.PREFIX + t) for t in onnx_plan.candidate_types(ctx.onnx_backend)
            if not options.file_types or onnx_plan.PREFIX + t in options.file_types] if "onnx" in formats else []
    if "gguf" not in formats:
        return ctx, onnx, []
    ctx, bases, notes = _gguf_bases(ctx, options, floor)
    return ctx, bases + onnx, notes


def _gguf_bases(ctx: _Context, options: FitOptions, floor: int) -> tuple[_Context, list[Candidate], list[str]]:
    wanted = tuple(ft for ft in options.file_types if not onnx_plan.is_onnx(ft)) if options.file_types else None
    if wanted == ():                      # only ONNX types asked for
        return ctx, [], []
    stock = tuple(ft for ft in wanted if ft != mixed.MIXED) if wanted else None
    kinds, notes = file_types(ctx.facts, stock) if stock or not wanted else ([], [])
    bases = [Candidate(ft) for ft in kinds]
    if (not wanted or mixed.MIXED in wanted) and mixed.can_mix(ctx.facts):
        ctx, extra = _with_mixed(ctx, floor)
        bases += extra
    elif wanted and mixed.MIXED in wanted:
        notes.append(f"no mixed-precision candidates: the source is a {ctx.facts.source_type} GGUF (the allocator "
                     "starts from 16-bit weights)")
    if options.allow_prune:
        bases += _pruned_bases(ctx, stock, notes)
    return ctx, bases, notes


def _pruned_bases(ctx: _Context, stock: tuple[str, ...] | None, notes: list[str]) -> list[Candidate]:
    """Pruned candidates (--allow-prune): each measured pruning in the PRUNED_TYPES asked for."""
    why = prune.not_prunable(ctx.facts) or (None if ctx.facts.prunings else "no pruning was measured")
    if why:
        notes.append(f"no pruned candidates: {why}")
        return []
    notes.append("pruned candidates (--allow-prune) drop whole blocks: their KLD is measured, far riskier than "
                 "quantization; check the output before shipping one")
    types = [ft for ft in prune.PRUNED_TYPES if not stock or ft in stock]
    return [Candidate(ft, label=f"{ft}-{p.label}", prune=p.drop) for p in ctx.facts.prunings for ft in types]


def _with_mixed(ctx: _Context, floor: int) -> tuple[_Context, list[Candidate]]:
    """Mixed candidates: budgets between the stock types and the largest weight size that fits."""
    facts, priors, n = ctx.facts, ctx.tables.quality, ctx.facts.n_params
    options = mixed.proxy_options(facts, priors)
    low, high = mixed.weight_bounds(options, mixed.fixed_weights(facts))
    stock = mixed.stock_sizes(facts)
    affordable = None if ctx.device_budget else _affordable_weights(ctx, options, floor, low, high)
    curve = mixed.stock_curve(facts, priors, FILE_TYPE_LADDER)
    recipes, priors_by_label, bases = {}, {}, []
    for budget in mixed.budgets(stock, low, high, affordable):
        label = mixed.label(budget, n)
        recipes[label] = mixed.proxy_recipe(facts, options, budget)
        priors_by_label[label] = mixed.mixed_prior(budget, curve, n, priors)
        bases.append(Candidate(mixed.MIXED, weights_budget=budget, label=label))
    return replace(ctx, mixed=recipes, mixed_prior=priors_by_label), bases


AFFORDABLE_TRIES = 3        # re-sizings of the largest affordable mix (repacked tensors change with the mix)


def _affordable_weights(ctx: _Context, options: list, floor: int, low: int, high: int) -> int | None:
    """The largest weight budget whose mix fits the memory budget at ``floor`` tokens, None below the
    smallest mix. Starts from the non-weight memory of a Q8_0 row, then shrinks by what the mix overshoots."""
    probe = _sized(ctx, Candidate("Q8_0", n_ctx=floor))
    budget = min(high, ctx.budget - (_need(probe) - probe.memory.weights_bytes))
    for _ in range(AFFORDABLE_TRIES):
        if budget < low:
            return None
        label = mixed.label(budget, ctx.facts.n_params)
        trial = replace(ctx, mixed={label: mixed.proxy_recipe(ctx.facts, options, budget)})
        row = _sized(trial, Candidate(mixed.MIXED, n_ctx=floor, weights_budget=budget, label=label))
        if row.fits:
            return budget
        budget -= _need(row) - ctx.budget
    return None


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
    for kv in () if onnx_plan.is_onnx(cand.file_type) else KV_FALLBACKS:
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
