"""Mixed-precision candidates: a weight budget that the GGUF converter's allocator fills (pure).

A mixed candidate is a number of bytes, not a recipe: ``build`` hands the budget to
``edgellm.converters.sensitivity.quantize_to_budget``, which measures what each tensor's quantization costs
and picks one type per tensor (the written file lands at most 1% under the budget). To size memory and speed
before anything is measured, the planner needs *a* type mix of those bytes: ``proxy_recipe`` solves the same
knapsack (``converters.allocate.solve``) with a prior loss per weight for each type, so sizes, repacked
tensors and bytes read per token are those of a plausible mix. With ``--measure-quality`` the measured loss
model replaces the proxy (``quality_measure``), and its allocation gives the exact types.

Budgets offered: points between the stock types (geometric midpoints of the weight sizes of ``STOCK_POINTS``)
and the largest weight size that fits the device's memory budget (``planner`` computes that one).
"""

from __future__ import annotations

import functools
from math import exp, log, sqrt
from typing import Mapping, Sequence

from edgellm.converters import allocate as alloc
from edgellm.converters.quant_types import FLOAT_TYPES, TensorInfo, is_quantizable
from edgellm.fitting.facts import ModelFacts
from edgellm.fitting.quality import QualityPriors, prior_kld
from edgellm.fitting.quant import Recipe, recipe, weight_bytes

MIXED = "MIXED"                                   # Candidate.file_type of a mixed-precision candidate
STOCK_POINTS = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M")   # mixed budgets go between neighbours
MIN_ABOVE_SMALLEST = 1.05   # no budget within 5% of the smallest mix (everything at the lowest type)
DISTINCT = 1.02            # stock sizes closer than 2% (row fallbacks make some types equal) get no point between
PROXY_RESOLUTION = 20_000  # knapsack units: rounding leaves at most n_tensors/20000 of the budget unused (~1%)
PROXY_ALIGNMENT = 1         # the planner counts tensor data unpadded (as weight_bytes does)

# ggml type -> the file type whose prior KLD stands for it in the proxy loss (its main type)
TYPE_PRIOR: dict[str, str] = {"F16": "F16", "Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K": "Q5_K_M", "Q5_1": "Q5_1",
                              "Q5_0": "Q5_0", "Q4_K": "Q4_K_M", "Q4_1": "Q4_1", "IQ4_XS": "IQ4_XS",
                              "IQ4_NL": "IQ4_NL", "Q4_0": "Q4_0", "Q3_K": "Q3_K_M", "IQ3_S": "IQ3_S", "Q2_K": "Q2_K"}


def can_mix(facts: ModelFacts) -> bool:
    """Whether the allocator can start from this source: a checkpoint (converted to F16 first) or a float GGUF."""
    return facts.source_format == "hf" or facts.source_type in FLOAT_TYPES


def label(weights_budget: int, n_params: int) -> str:
    """The candidate's name: ``MIXED@<bits per weight>bpw``."""
    return f"{MIXED}@{8 * weights_budget / max(n_params, 1):.2f}bpw"


def _float_recipe(facts: ModelFacts) -> dict[str, str]:
    """The types of the F16 GGUF the allocator starts from (norms stay F32)."""
    return recipe(facts, "F16")[0]


def proxy_options(facts: ModelFacts, priors: QualityPriors) -> list[alloc.TensorOptions]:
    """Per quantizable tensor, the allocator's candidate types with a prior loss: the type's prior KLD times
    the tensor's share of the weights (no tensor is more sensitive than another without a measurement)."""
    from edgellm.converters.sensitivity import DEFAULT_CANDIDATES, candidate_types

    base, total = _float_recipe(facts), max(facts.n_params, 1)
    out = []
    for t in facts.tensors:
        info = TensorInfo(t.name, t.ne, base[t.name])
        if not is_quantizable(info):
            continue
        losses = {ty: priors.kld[TYPE_PRIOR[ty]] * t.n_elements / total
                  for ty in candidate_types(info, DEFAULT_CANDIDATES, True) if TYPE_PRIOR.get(ty) in priors.kld}
        out.append(alloc.tensor_options(t.name, "prior", t.ne, losses, PROXY_ALIGNMENT))
    return out


def fixed_weights(facts: ModelFacts) -> int:
    """Tensor bytes no type choice changes (norms and other tensors llama.cpp never quantizes)."""
    base = _float_recipe(facts)
    return sum(t.bytes_as(base[t.name]) for t in facts.tensors
               if not is_quantizable(TensorInfo(t.name, t.ne, base[t.name])))


def weight_bounds(options: Sequence[alloc.TensorOptions], fixed: int) -> tuple[int, int]:
    """(smallest, largest) weight bytes the allocator can reach."""
    return alloc.bounds(options, fixed)


def proxy_recipe(facts: ModelFacts, options: Sequence[alloc.TensorOptions], weights_budget: int) -> Recipe:
    """A type per tensor whose weights total at most ``weights_budget`` bytes (prior losses; see module doc).
    Raises BudgetError below the smallest mix."""
    return _float_recipe(facts) | dict(_solve(tuple(options), weights_budget, fixed_weights(facts)))


@functools.lru_cache(maxsize=256)
def _solve(options: tuple[alloc.TensorOptions, ...], budget: int, fixed: int) -> tuple[tuple[str, str], ...]:
    """Memoized ``allocate.solve`` (the planner asks for the same budgets profile after profile)."""
    return tuple(alloc.solve(options, budget, fixed, resolution=PROXY_RESOLUTION).types.items())


def stock_sizes(facts: ModelFacts, file_types: Sequence[str] = STOCK_POINTS) -> dict[str, int]:
    """Weight bytes of each stock file type (llama.cpp's exact recipe when known)."""
    return {ft: weight_bytes(facts.tensors, recipe(facts, ft)[0]) for ft in file_types}


def budgets(stock: Mapping[str, int], low: int, high: int, largest_affordable: int | None) -> list[int]:
    """Weight budgets to offer, largest first: midpoints between neighbouring stock sizes, and the largest
    affordable size when it is below the biggest stock point (above it, stock types fit anyway)."""
    sizes = sorted(stock.values(), reverse=True)
    points = [int(sqrt(a * b)) for a, b in zip(sizes, sizes[1:]) if a > b * DISTINCT]
    if largest_affordable is not None and sizes and largest_affordable < sizes[0]:
        points.append(largest_affordable)
    return sorted({p for p in points if low * MIN_ABOVE_SMALLEST <= p <= high}, reverse=True)


# ------------------------------------------------------------------------------------------- quality prior

def stock_curve(facts: ModelFacts, priors: QualityPriors, file_types: Sequence[str]) -> list[tuple[int, float, str]]:
    """(weight bytes, prior KLD, file type) of the stock file types, smallest first."""
    points = []
    for ft in file_types:
        kld = prior_kld(ft, facts.n_params, priors)
        if kld is not None:
            points.append((weight_bytes(facts.tensors, recipe(facts, ft)[0]), kld, ft))
    return sorted(points)


def best_stock(curve: Sequence[tuple[int, float, str]], weights_budget: int) -> tuple[float, str] | None:
    """(prior KLD, file type) of the best stock type within ``weights_budget`` bytes, None when none fits.
    A step, not an interpolation: row fallbacks make small models' stock sizes non-monotonic in quality."""
    fitting = [(kld, ft) for size, kld, ft in curve if size <= weights_budget]
    return min(fitting) if fitting else None


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float:
    """log-linear interpolation of y over x (clamped to the end points); points sorted by x, y > 0."""
    if x <= points[0][0]:
        return points[0][1]
    if x >= points[-1][0]:
        return points[-1][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            f = (x - x0) / (x1 - x0) if x1 > x0 else 0.0
            return exp(log(y0) + f * (log(y1) - log(y0)))
    return points[-1][1]


def mixed_prior(weights_budget: int, curve: Sequence[tuple[int, float, str]], n_params: int,
                priors: QualityPriors) -> tuple[float, str]:
    """(expected KLD, how it was obtained) of a mixed candidate of ``weights_budget`` bytes without a
    measurement: the measured mixed points of quality_priors.toml within their range, else ``stock_ratio``
    times the prior of the best stock type that fits the same bytes (the allocator can place bits at least as
    well as a stock recipe of that size; how much better it does is what the ratio credits)."""
    m, bits = priors.mixed, 8 * weights_budget / max(n_params, 1)
    if len(m.points) >= 2 and m.points[0][0] <= bits <= m.points[-1][0]:
        kld = interpolate(m.points, bits)
        if n_params >= priors.small_model_params > m.points_params:
            kld /= priors.small_model_scale          # the points come from a small model
        return kld, f"prior from measured mixed-precision points at {bits:.2f} bits per weight ({m.source})"
    best = best_stock(curve, weights_budget) or (min(curve)[1:] if curve else None)
    if best is None:
        return 1.0, "no stock prior to compare with: counted as 1.0 (measure it with --measure-quality)"
    kld, how = m.stock_ratio * best[0], (f"prior: {m.stock_ratio:g} x the prior of {best[1]}, the best stock type "
                                         "of at most these bytes (--measure-quality prices this budget)")
    if len(m.points) >= 2 and bits > m.points[-1][0] and kld > m.points[-1][1]:
        # more bytes than the largest measured point cannot cost more than that point did
        return m.points[-1][1], (f"prior: no worse than the measured mixed-precision point at "
                                 f"{m.points[-1][0]:.2f} bits per weight ({m.source})")
    return kld, how
