"""Mixed precision under a byte budget: choose one ggml type per tensor (pure; no files, no llama.cpp).

The loss model is fitted here to probes measured elsewhere (``edgellm.converters.sensitivity``): for tensor
t and type T, ``expected_loss = gain(group of t) * (relative_error(t, T) + floor(T))``. ``relative_error`` is
the importance-weighted squared quantization error of the tensor divided by its importance-weighted squared
norm; ``floor`` is what rounding the activations costs when a CPU matmul runs on quantized weights (8-bit
activations, zero for float weights); ``gain`` converts both into KL divergence (nats per token) against the
unquantized model. Losses of different tensors add up (small, independent perturbations: on Gemma 3 270M all
126 layer matrices at Q4_0 measured 0.249 against 0.244 predicted from 14 separate group probes).

``solve`` then picks one option per tensor minimising the summed expected loss with the total file bytes
within the budget: a multiple-choice knapsack, solved exactly by dynamic programming over the budget cut into
``resolution`` units (each option's bytes rounded *up* to whole units, so the real total never exceeds the
budget; the rounding can leave at most ``len(tensors)`` units unused, which the default resolution keeps
under 0.25% of the budget).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np

from edgellm.converters import quant_types as qt
from edgellm.errors import BudgetError
from edgellm.units import format_bytes

METADATA_KEY = "edgellm.quantization.allocation"   # GGUF string key holding ``Allocation.to_json()``
FORMAT_VERSION = 1
GGUF_ALIGNMENT = 32              # bytes; tensor data offsets are padded to it (general.alignment overrides)
UNITS_PER_TENSOR = 400           # DP resolution per tensor: rounding wastes at most 1/400 of the budget
MIN_RESOLUTION = 20_000          # DP units at least (small models)
MAX_PICK_BYTES = 1 << 27         # the DP keeps one int8 pick per (tensor, unit): at most 128 MiB of them
SIGNIFICANT = 4                  # digits kept for floats in the JSON record

_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(.+?)(?:\.weight)?$")


# ---------------------------------------------------------------------------------------------------------------
# Groups and sizes
# ---------------------------------------------------------------------------------------------------------------

def tensor_group(name: str, n_layers: int, bands: int) -> str:
    """Sensitivity group of a tensor: ``kind@band`` for block weights (``ffn_down@0``), else the name's stem.

    Layers are cut into ``bands`` consecutive bands of (nearly) equal size; ``bands=1`` groups by kind only.
    """
    match = _BLOCK_TENSOR.match(name)
    if not match:
        return name.removesuffix(".weight")
    kind = match[2]
    if bands <= 1 or n_layers <= 1:
        return kind
    band = min(int(match[1]) * bands // n_layers, bands - 1)
    return f"{kind}@{band}"


def padded(n_bytes: int, alignment: int = GGUF_ALIGNMENT) -> int:
    """``n_bytes`` rounded up to the GGUF tensor alignment."""
    return -(-n_bytes // alignment) * alignment


def tensor_bytes(ne: Sequence[int], type_name: str, alignment: int = GGUF_ALIGNMENT) -> int:
    """Bytes a tensor of shape ``ne`` (ggml order, ne[0] = row length) takes in a GGUF file as ``type_name``."""
    gtype = qt.GGML_TYPES[type_name]
    rows = int(np.prod(ne[1:], dtype=np.int64)) if len(ne) > 1 else 1
    return padded(rows * gtype.row_bytes(int(ne[0])), alignment)


# ---------------------------------------------------------------------------------------------------------------
# Options and the result
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """One type a tensor could be stored in."""

    type: str            # ggml type, e.g. "Q5_1"
    bytes: int           # tensor data bytes in the file, padded
    loss: float          # expected KL divergence (nats/token) this tensor adds in this type


@dataclass(frozen=True)
class TensorOptions:
    """The types one tensor may take, with their bytes and expected losses."""

    name: str
    group: str
    n_elements: int
    options: tuple[Option, ...]


@dataclass(frozen=True)
class Choice:
    """The type chosen for one tensor, why, and what else was possible."""

    name: str
    group: str
    type: str
    bytes: int
    loss: float
    reason: str
    alternatives: tuple[Option, ...]   # every option considered, cheapest first


@dataclass(frozen=True)
class Allocation:
    """One type per quantizable tensor, fitted to ``budget_bytes``; ``fixed_bytes`` is everything else."""

    budget_bytes: int
    fixed_bytes: int                   # header, vocabulary, tensors that are never quantized, padding
    choices: tuple[Choice, ...]
    measurements: Mapping[str, Any] = field(default_factory=dict)   # how the losses were measured

    @property
    def total_bytes(self) -> int:
        """Predicted file size."""
        return self.fixed_bytes + sum(c.bytes for c in self.choices)

    @property
    def expected_loss(self) -> float:
        """Predicted KL divergence against the unquantized model, nats per token."""
        return float(sum(c.loss for c in self.choices))

    @property
    def types(self) -> dict[str, str]:
        """Tensor name -> chosen ggml type."""
        return {c.name: c.type for c in self.choices}

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for c in self.choices:
            counts[c.type] = counts.get(c.type, 0) + 1
        return dict(sorted(counts.items()))

    def overrides(self) -> dict[str, str]:
        """Exact-name patterns for ``quantize_gguf(overrides=...)``: one anchored regex per tensor."""
        return {f"^{re.escape(c.name)}$": c.type for c in self.choices}

    def base_file_type(self) -> str:
        """The llama.cpp file type to quantize with: the one whose main type holds most bytes here.

        Every quantizable tensor gets an explicit override, so this only names the file (general.file_type);
        it must be a quantized type, because llama.cpp ignores overrides for float file types.
        """
        by_type: dict[str, int] = {}
        for c in self.choices:
            by_type[c.type] = by_type.get(c.type, 0) + c.bytes
        for gtype, _ in sorted(by_type.items(), key=lambda kv: (-kv[1], kv[0])):
            names = [f.name for f in qt.FILE_TYPES.values()
                     if f.main == gtype and not f.needs_imatrix and gtype not in qt.FLOAT_TYPES]
            for preferred in (gtype, f"{gtype}_M", *names):   # Q4_K -> Q4_K_M, as llama-quantize's alias
                if preferred in names:
                    return preferred
        return "Q8_0"

    def with_fixed_bytes(self, fixed_bytes: int) -> "Allocation":
        return replace(self, fixed_bytes=fixed_bytes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record: totals, measurements and, per tensor, type, bytes, loss, reason, alternatives."""
        return {
            "version": FORMAT_VERSION,
            "budget_bytes": self.budget_bytes,
            "predicted_bytes": self.total_bytes,
            "fixed_bytes": self.fixed_bytes,
            "expected_kld": rounded(self.expected_loss),
            "types": self.type_counts(),
            "measurements": dict(self.measurements),
            "tensors": {c.name: {"type": c.type, "bytes": c.bytes, "expected_kld": rounded(c.loss), "group": c.group,
                                 "reason": c.reason,
                                 "alternatives": [[o.type, o.bytes, rounded(o.loss)] for o in c.alternatives]}
                        for c in self.choices},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> "Allocation":
        """Read back ``to_json`` (e.g. the GGUF metadata value); floats come back rounded to 4 digits."""
        data = json.loads(text)
        choices = tuple(
            Choice(name, t["group"], t["type"], t["bytes"], t["expected_kld"], t["reason"],
                   tuple(Option(*alt) for alt in t["alternatives"]))
            for name, t in data["tensors"].items())
        return cls(data["budget_bytes"], data["fixed_bytes"], choices, data.get("measurements", {}))


def rounded(x: float) -> float:
    return float(f"{x:.{SIGNIFICANT}g}")


# ---------------------------------------------------------------------------------------------------------------
# The loss model
# ---------------------------------------------------------------------------------------------------------------

def tensor_options(name: str, group: str, ne: Sequence[int], losses: Mapping[str, float],
                   alignment: int = GGUF_ALIGNMENT) -> TensorOptions:
    """Options for one tensor: the expected loss per type, bytes from the block layout."""
    options = sorted((Option(t, tensor_bytes(ne, t, alignment), float(loss)) for t, loss in losses.items()),
                     key=lambda o: (o.bytes, o.loss, o.type))
    return TensorOptions(name, group, int(np.prod(ne, dtype=np.int64)), tuple(options))


def pareto(options: Sequence[Option]) -> list[Option]:
    """Options not beaten by a cheaper-or-equal one with lower-or-equal loss, cheapest first."""
    front: list[Option] = []
    for o in sorted(options, key=lambda o: (o.bytes, o.loss, o.type)):
        if not front or o.loss < front[-1].loss:
            front.append(o)
    return front


# ---------------------------------------------------------------------------------------------------------------
# Fitting the loss model to measured probes
# ---------------------------------------------------------------------------------------------------------------

# What a CPU matmul with weights of each type quantizes its input activations to (ggml-cpu type_traits_cpu
# vec_dot_type): every quantized weight adds that rounding of the activations, on top of its own error. Q8_1 is
# Q8_0 with block sums (the same rounding), so both count as "Q8_0". Float weights keep float activations.
ACTIVATION_TYPES: dict[str, str | None] = {
    "F32": None, "F16": None, "BF16": None,
    "Q8_0": "Q8_0", "Q5_0": "Q8_0", "Q4_0": "Q8_0", "IQ4_NL": "Q8_0", "MXFP4": "Q8_0",
    "Q5_1": "Q8_0", "Q4_1": "Q8_0",
    "Q6_K": "Q8_K", "Q5_K": "Q8_K", "Q4_K": "Q8_K", "Q3_K": "Q8_K", "Q2_K": "Q8_K", "IQ4_XS": "Q8_K",
    "IQ3_S": "Q8_K", "IQ3_XXS": "Q8_K", "IQ2_S": "Q8_K", "IQ2_XS": "Q8_K", "IQ2_XXS": "Q8_K", "IQ1_M": "Q8_K",
    "IQ1_S": "Q8_K", "TQ2_0": "Q8_K", "TQ1_0": "Q8_K",
}
FLOOR_SEARCH_STEPS = 100         # bisection steps for the activation floor
GAIN_FLOOR = 1e-3                # no group counts as free: gains below this fraction of the largest are raised


def is_block_tensor(name: str) -> bool:
    """Weights inside a transformer block (``blk.N.*``): the ones the activation floor applies to.

    The output head's own activation rounding is folded into its measured gain instead (one group, one probe).
    """
    return bool(_BLOCK_TENSOR.match(name))


@dataclass(frozen=True)
class Probe:
    """One measurement: these tensors in these types, everything else unquantized, and the KLD that caused."""

    label: str
    types: Mapping[str, str]      # tensor name -> ggml type it was quantized to
    kld: float                    # mean KL(unquantized || probed), nats/token, on calibration text
    kld_stderr: float


@dataclass(frozen=True)
class LossModel:
    """``loss(tensor, type) = gain(group) * (relative_error + floor(activation type))`` (floor: block weights)."""

    gains: Mapping[str, float]    # group -> expected KLD per unit of relative error
    floors: Mapping[str, float]   # activation type ("Q8_0", "Q8_K") -> relative error its rounding adds
    group_of: Mapping[str, str]   # tensor name -> group

    def loss(self, name: str, type_name: str, relative_error: float) -> float:
        return self.gains[self.group_of[name]] * (relative_error + self.floor(name, type_name))

    def floor(self, name: str, type_name: str) -> float:
        family = ACTIVATION_TYPES.get(type_name)
        return self.floors.get(family, 0.0) if family and is_block_tensor(name) else 0.0


def fit_loss_model(group_probes: Mapping[str, Probe], floor_probes: Mapping[str, Probe],
                   errors: Mapping[str, Mapping[str, float]], group_of: Mapping[str, str]) -> LossModel:
    """Gains and activation floors that reproduce the measured KLDs.

    ``group_probes``: one probe per group (its tensors in one type). ``floor_probes``: keyed by activation type,
    probes of many block tensors in a type with a small weight error (all at Q8_0; the k-quant-capable ones at
    Q6_K), whose KLD is mostly activation rounding. Q8_0's floor is found by bisection (the group gains depend
    on it); Q8_K's then follows linearly, and defaults to Q8_0's when not probed.
    """
    def model(floor_q8: float, floor_k: float | None = None) -> LossModel:
        floors = {"Q8_0": floor_q8, "Q8_K": floor_q8 if floor_k is None else floor_k}
        probe_model = LossModel({g: 1.0 for g in group_probes}, floors, group_of)
        gains = {g: p.kld / max(_probe_error(p, errors, probe_model), 1e-30) for g, p in group_probes.items()}
        return LossModel(gains, floors, group_of)

    fitted = model(0.0)
    if "Q8_0" in floor_probes:
        fitted = model(_bisect_floor(lambda f: predicted_kld(model(f), floor_probes["Q8_0"].types, errors),
                                     floor_probes["Q8_0"].kld, errors))
    if "Q8_K" in floor_probes:
        probe = floor_probes["Q8_K"]
        base = predicted_kld(replace(fitted, floors={**fitted.floors, "Q8_K": 0.0}), probe.types, errors)
        weight = sum(fitted.gains[group_of[n]] for n in probe.types if is_block_tensor(n))
        fitted = model(fitted.floors["Q8_0"], max(probe.kld - base, 0.0) / max(weight, 1e-30))
    return replace(fitted, gains=_floored_gains(fitted.gains))


def _probe_error(probe: Probe, errors: Mapping[str, Mapping[str, float]], unit: LossModel) -> float:
    """Relative error of a probe's tensors, activation floor included (the loss at unit gain)."""
    return sum(unit.loss(n, t, errors[n][t]) for n, t in probe.types.items())


def predicted_kld(model: LossModel, types: Mapping[str, str], errors: Mapping[str, Mapping[str, float]]) -> float:
    """Expected KLD of quantizing ``types`` (tensor -> type), everything else unquantized."""
    return sum(model.loss(n, t, errors[n][t]) for n, t in types.items())


def _bisect_floor(predict, measured: float, errors: Mapping[str, Mapping[str, float]]) -> float:
    """The floor at which ``predict(floor)`` (increasing) meets ``measured``; 0 when even no floor over-predicts."""
    low, high = 0.0, max(max(e.values()) for e in errors.values()) or 1.0
    if predict(low) >= measured:
        return 0.0
    while predict(high) < measured and high < 1e6:
        high *= 4
    for _ in range(FLOOR_SEARCH_STEPS):
        mid = (low + high) / 2
        low, high = (mid, high) if predict(mid) < measured else (low, mid)
    return (low + high) / 2


def _floored_gains(gains: Mapping[str, float]) -> dict[str, float]:
    """No group is free: gains under ``GAIN_FLOOR`` x the largest are raised; all 1 when nothing was measurable
    (then quantization error alone decides)."""
    top = max(gains.values(), default=0.0)
    if top <= 0:
        return {g: 1.0 for g in gains}
    return {g: max(v, GAIN_FLOOR * top) for g, v in gains.items()}


# ---------------------------------------------------------------------------------------------------------------
# The solver
# ---------------------------------------------------------------------------------------------------------------

def bounds(tensors: Sequence[TensorOptions], fixed_bytes: int) -> tuple[int, int]:
    """(smallest, largest) file size any choice of options gives."""
    low = fixed_bytes + sum(min(o.bytes for o in t.options) for t in tensors)
    high = fixed_bytes + sum(max(o.bytes for o in t.options) for t in tensors)
    return low, high


def solve(tensors: Sequence[TensorOptions], budget_bytes: int, fixed_bytes: int, *,
          resolution: int | None = None, budget_label: str | None = None) -> Allocation:
    """Choose one option per tensor: least total expected loss with ``fixed_bytes + chosen bytes <= budget``.

    Exact up to rounding bytes up to ``budget / resolution`` units; deterministic (ties go to the cheaper
    option). ``budget_label`` names the budget in errors (default: the bytes).

    Raises:
        BudgetError: even the smallest option of every tensor exceeds the budget.
        ValueError: a tensor without options.
    """
    for t in tensors:
        if not t.options:
            raise ValueError(f"tensor {t.name} has no candidate type")
    low, high = bounds(tensors, fixed_bytes)
    if low > budget_bytes:
        raise BudgetError(budget=budget_label or format_bytes(budget_bytes),
                          problem=f"the smallest types that fit its tensors give {format_bytes(low)} "
                                  f"({len(tensors)} tensors plus {format_bytes(fixed_bytes)} of header and "
                                  "unquantized tensors)",
                          hint_text=f"ask for at least {format_bytes(low)}, or a smaller model")
    fronts = [pareto(t.options) for t in tensors]
    if high <= budget_bytes:     # everything at its best fits: no trade-off to make
        picks = [front[-1] for front in fronts]
    else:
        units = resolution or max(MIN_RESOLUTION, min(UNITS_PER_TENSOR * len(tensors), MAX_PICK_BYTES // len(tensors)))
        picks = _upgrade(fronts, _knapsack(fronts, budget_bytes - fixed_bytes, units), budget_bytes - fixed_bytes)
    choices = tuple(_choice(t, front, pick) for t, front, pick in zip(tensors, fronts, picks))
    return Allocation(budget_bytes, fixed_bytes, choices)


def _knapsack(fronts: Sequence[Sequence[Option]], capacity: int, units: int) -> list[Option]:
    """Multiple-choice knapsack by DP over ``units`` (each option's bytes rounded up to whole units)."""
    costs = [[-(-o.bytes * units // capacity) for o in front] for front in fronts]
    if sum(c[0] for c in costs) > units:   # fits in bytes, not after rounding: the cheapest options are the answer
        return [front[0] for front in fronts]
    best = np.zeros(units + 1)             # best[c]: least loss of the tensors so far within c units
    picks = np.empty((len(fronts), units + 1), dtype=np.int8)   # option index (< 128 types)
    for i, (front, cost) in enumerate(zip(fronts, costs)):
        trial = np.full((len(front), units + 1), np.inf)
        for k, (option, c) in enumerate(zip(front, cost)):
            if c <= units:
                trial[k, c:] = best[:units + 1 - c] + option.loss
        picks[i] = np.argmin(trial, axis=0)   # first minimum: the cheaper option on ties
        best = trial[picks[i], np.arange(units + 1)]
    chosen, c = [], units
    for i in range(len(fronts) - 1, -1, -1):
        k = int(picks[i, c])
        chosen.append(fronts[i][k])
        c -= costs[i][k]
    return chosen[::-1]


def _upgrade(fronts: Sequence[Sequence[Option]], picks: list[Option], capacity: int) -> list[Option]:
    """Spend the bytes the DP's rounding left unused, exactly: best single upgrades while one fits."""
    picks = list(picks)
    spare = capacity - sum(o.bytes for o in picks)
    while True:
        moves = [(o.loss - pick.loss, i, o) for i, (front, pick) in enumerate(zip(fronts, picks))
                 for o in front if o.loss < pick.loss and o.bytes - pick.bytes <= spare]
        if not moves:
            return picks
        _, i, option = min(moves, key=lambda m: (m[0], m[1]))
        spare -= option.bytes - picks[i].bytes
        picks[i] = option


def _choice(t: TensorOptions, front: Sequence[Option], pick: Option) -> Choice:
    return Choice(t.name, t.group, pick.type, pick.bytes, pick.loss, _reason(front, pick), tuple(t.options))


def _reason(front: Sequence[Option], pick: Option) -> str:
    """What the neighbours on the loss/bytes front would have cost: why this type and not the next one."""
    k = front.index(pick)
    parts = [f"{pick.type}: expected KLD {pick.loss:.3g} for {format_bytes(pick.bytes)}"]
    if k > 0:
        lower = front[k - 1]
        parts.append(f"{lower.type} saves {format_bytes(pick.bytes - lower.bytes)} for +{lower.loss - pick.loss:.3g}")
    if k + 1 < len(front):
        upper = front[k + 1]
        parts.append(f"{upper.type} costs {format_bytes(upper.bytes - pick.bytes)} more for "
                     f"-{pick.loss - upper.loss:.3g}")
    if len(front) == 1:
        parts.append("the only type worth considering")
    return "; ".join(parts)

