"""The plan as text: one line per candidate with the chosen one marked, then the decisions. Pure."""

from __future__ import annotations

from edgellm.fitting.candidates import SOURCE
from edgellm.fitting.planner import CHOSEN, Evaluated, Plan
from edgellm.units import format_bytes

HEADERS = ("", "CANDIDATE", "N_CTX", "WEIGHTS", "MEMORY", "OF BUDGET", "TOK/S", "KLD", "VERDICT", "REASON")
CHOSEN_MARK = "*"


def display_name(row: Evaluated, source_type: str) -> str:
    """The candidate's name, with a GGUF kept as it is shown as "<its type> as is"."""
    key = row.candidate.key
    return key.replace(SOURCE, f"{source_type} as is", 1) if row.candidate.file_type == SOURCE else key


def _cells(row: Evaluated, source_type: str) -> list[str]:
    mem, budget = row.memory, row.budget_bytes
    need = mem.host_bytes if row.device_budget_bytes else mem.total_bytes
    kld = f"{row.quality.kld:.4f}" + ("" if row.quality.source == "measured" else "~")
    return [CHOSEN_MARK if row.verdict == CHOSEN else "", display_name(row, source_type), str(row.candidate.n_ctx),
            format_bytes(mem.weights_bytes), format_bytes(mem.total_bytes), f"{100 * need / budget:.0f}%",
            f"{row.speed.decode_tokens_per_s:.1f}", kld, row.verdict, row.reason]


def table(rows: list[list[str]], headers: tuple[str, ...] = HEADERS) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def breakdown(row: Evaluated) -> str:
    """The chosen candidate's memory, component by component."""
    m = row.memory
    parts = [("weights", m.weights_bytes), ("repacked", m.repack_bytes), ("KV cache", m.kv_cache_bytes),
             ("compute", m.compute_bytes), ("output", m.output_bytes), ("vocab", m.vocab_bytes),
             ("sampling", m.sampling_bytes), ("runtime", m.runtime_bytes), ("GPU context", m.device_context_bytes),
             ("GPU weights copy", m.device_weights_bytes), ("context", m.context_bytes)]
    return ", ".join(f"{name} {format_bytes(n)}" for name, n in parts if n)


def render(plan: Plan) -> str:
    """The plan table and its notes, for stderr."""
    c = plan.chosen
    head = (f"fit {plan.facts.name} ({plan.facts.source_type}, {plan.facts.n_params / 1e6:.0f}M parameters) for "
            f"{plan.profile.id} ({format_bytes(c.budget_bytes)} usable, {plan.backend})")
    lines = [head, table([_cells(r, plan.facts.source_type) for r in plan.rows]),
             f"{CHOSEN_MARK} {display_name(c, plan.facts.source_type)}: {breakdown(c)}; total {format_bytes(c.memory.total_bytes)}",
             f"  speed: {c.speed.decode_tokens_per_s:.1f} tok/s decode ({c.speed.decode_tokens_per_s_full:.1f} with "
             f"the context full), {c.speed.prefill_tokens_per_s:.0f} tok/s prefill; {c.speed.bound}-bound; "
             f"{c.speed.basis}",
             f"  quality: KLD {c.quality.kld:.4f} ({c.quality.source}: {c.quality.note})",
             "KLD~ = prior or loss-model estimate (not measured on text); MIXED@<bpw> = one type per tensor chosen by the "
             "allocator within those bits per weight; memory is the predicted peak resident memory while generating"]
    lines.append(calibration_line(plan))
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def calibration_line(plan: Plan) -> str:
    """Which speed coefficients the plan used: a device calibration (file and source) or the built-in table."""
    cal = plan.calibration
    if cal:
        types = ", ".join(sorted({t for c in cal["cpu_cycles"].values() for t in c})) or "none"
        return f"speed calibration: {cal['path'] or cal['device']} ({cal['source']}; kernel costs measured for {types})"
    hint = " (`edgellm bench MODEL --calibrate` measures this machine)" if plan.device_request == "local" else ""
    return f"speed calibration: none, built-in efficiency table{hint}"
