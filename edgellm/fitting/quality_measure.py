"""``--measure-quality``: quantize the candidates that fit and measure their KL divergence (I/O).

The reference is the 16-bit model (for a checkpoint, an F16 conversion; for a GGUF source, the source file
itself, whose own loss the prior then adds). Each candidate is scored with ``edgellm.evaluate`` on the
shipped evaluation text; a candidate with a quantized KV cache is scored through a small bundle that
carries its cache type.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path

from edgellm import bundle as bundles
from edgellm.fitting.candidates import SOURCE
from edgellm.fitting.facts import ModelFacts
from edgellm.fitting import onnx_plan
from edgellm.fitting.mixed import MIXED
from edgellm.fitting.planner import CHOSEN, OK, Evaluated, Plan

logger = logging.getLogger(__name__)

MAX_CANDIDATES = 6          # the best-by-prior candidates that fit; each costs a quantization and a scoring run
MAX_TOKENS = 1024           # evaluation tokens per candidate (reference/measured-here.md used 1024)
EVAL_N_CTX = 512


def _reference(plan: Plan, folder: Path) -> Path:
    if plan.facts.source_format == "gguf":
        return Path(plan.facts.source)
    from edgellm.converters import convert
    path = folder / "reference-f16.gguf"
    convert(plan.facts.source, path, type="f16")
    return path


def _candidate_file(row: Evaluated, plan: Plan, reference: Path, folder: Path) -> Path:
    file_type = row.candidate.file_type
    if file_type == SOURCE or (file_type == "F16" and plan.facts.source_format == "hf"):
        return reference
    from edgellm.converters.quantize import quantize_gguf
    path = folder / f"{file_type.lower()}.gguf"
    if not path.exists():
        quantize_gguf(reference, path, file_type, allow_requantize=plan.facts.source_format == "gguf")
    return path


def _with_kv(path: Path, kv_type: str, folder: Path) -> Path:
    """A bundle folder that runs ``path`` with a ``kv_type`` cache (the runtime reads it from the manifest)."""
    if kv_type == "f16":
        return path
    target = folder / f"kv-{kv_type}-{path.stem}"
    target.mkdir(exist_ok=True)
    (target / path.name).unlink(missing_ok=True)
    (target / path.name).symlink_to(path)
    manifest = bundles.Manifest(model=path.name, files=(bundles.BundleFile(path.name, path.stat().st_size, ""),),
                                runtime=bundles.RuntimeSettings(kv_type=kv_type))
    bundles.write_manifest(target, manifest)
    return target


def measure_candidates(plan: Plan, *, max_candidates: int = MAX_CANDIDATES, max_tokens: int = MAX_TOKENS) -> ModelFacts:
    """The plan's facts with ``measured_kld`` filled for the best stock candidates that fit, and, when the plan
    has mixed-precision candidates, ``predicted_kld`` and exact ``recipes`` for them from one sensitivity
    measurement (``price_mixed``)."""
    from edgellm.evaluate import evaluate

    fitting = [r for r in plan.rows if r.verdict in (OK, CHOSEN)]
    # mixed rows are priced below; pruned rows were measured already; ONNX rows keep their priors
    stock = [r for r in fitting if r.candidate.file_type != MIXED and not r.candidate.prune
             and not onnx_plan.is_onnx(r.candidate.file_type)]
    rows = sorted(stock, key=lambda r: r.quality.kld)[:max_candidates]
    measured = dict(plan.facts.measured_kld)
    facts = plan.facts
    with tempfile.TemporaryDirectory(prefix="edgellm-quality-") as tmp:
        folder = Path(tmp)
        reference = _reference(plan, folder)
        for row in rows:
            model = _with_kv(_candidate_file(row, plan, reference, folder), row.candidate.kv_type, folder)
            result = evaluate(model, reference=reference, n_ctx=EVAL_N_CTX, max_tokens=max_tokens)
            measured[row.candidate.key] = result.comparison.kld_mean
            logger.info("%s: KLD %.4f", row.candidate.key, measured[row.candidate.key])
        budgets = {r.candidate.label: r.candidate.weights_budget for r in plan.rows if r.candidate.file_type == MIXED}
        if budgets:
            facts = price_mixed(facts, reference, budgets, work_dir=folder)
    return replace(facts, measured_kld=measured)


def price_mixed(facts: ModelFacts, f16_gguf: Path, budgets: dict[str, int], *, work_dir: Path) -> ModelFacts:
    """Measure the sensitivity of ``f16_gguf`` once (``converters.sensitivity.measure_sensitivity``: minutes
    for small models) and let its loss model price every mixed budget with ``allocate.solve`` (cheap): the
    facts gain ``predicted_kld`` and the allocation's exact types (``recipes``) by candidate label."""
    from edgellm.converters import allocate
    from edgellm.converters.sensitivity import fixed_bytes, measure_sensitivity
    from edgellm.fitting.bundler import file_budget
    from edgellm.fitting.quant import recipe

    sensitivity = measure_sensitivity(f16_gguf, work_dir=work_dir)
    fixed = fixed_bytes(f16_gguf, 0)
    float_types = recipe(facts, "F16")[0]
    predicted, recipes = dict(facts.predicted_kld), dict(facts.recipes)
    for label, weights_budget in budgets.items():
        allocation = allocate.solve(sensitivity.options, file_budget(f16_gguf, weights_budget), fixed)
        predicted[label] = allocation.expected_loss
        recipes[label] = float_types | allocation.types
        logger.info("%s: expected KLD %.4f (loss model)", label, predicted[label])
    return replace(facts, predicted_kld=predicted, recipes=recipes)
