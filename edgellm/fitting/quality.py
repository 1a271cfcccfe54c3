"""Expected quality loss of a candidate: measured KL divergence when there is one, else priors. Pure.

Priors are data (``edgellm/data/quality_priors.toml``): mean KLD per llama.cpp file type from llama.cpp's
Llama 3 8B scoreboard, scaled up for small models, plus what a quantized KV cache adds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class MixedPriors:
    """Expected KLD of mixed-precision (allocated) candidates without a measurement."""

    stock_ratio: float                    # x the stock types' prior interpolated at the same bits per weight
    points: tuple[tuple[float, float], ...] = ()   # measured (bits per weight, KLD), sorted; used within range
    points_params: int = 0                # parameters of the model the points were measured on
    source: str = ""


@dataclass(frozen=True)
class QualityPriors:
    kld: Mapping[str, float]              # file type -> mean KLD vs 16-bit
    kv_kld: Mapping[str, float]           # KV cache type -> KLD it adds
    small_model_params: int
    small_model_scale: float
    source: str = ""
    mixed: MixedPriors = MixedPriors(stock_ratio=1.0)


@dataclass(frozen=True)
class QualityEstimate:
    kld: float                            # expected mean KL divergence from the 16-bit model, nats per token
    source: str                           # "measured" or "prior"
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mixed_from_dict(data: Mapping[str, Any]) -> MixedPriors:
    """MixedPriors from the ``[mixed]`` table (KeyError on a missing key, ValueError on a bad point)."""
    points = tuple(sorted((float(p["bits_per_weight"]), float(p["kld"])) for p in data.get("points", ())))
    if any(k <= 0 for _, k in points):
        raise ValueError("[mixed] points need a positive kld")
    return MixedPriors(stock_ratio=float(data["stock_ratio"]), points=points,
                       points_params=int(data.get("points_params", 0)), source=str(data.get("points_source", "")))


def priors_from_dict(data: Mapping[str, Any]) -> QualityPriors:
    """QualityPriors from the parsed quality_priors.toml (KeyError on a missing table)."""
    return QualityPriors(kld=dict(data["kld"]), kv_kld=dict(data["kv_kld"]),
                         small_model_params=int(data["small_model_params"]),
                         small_model_scale=float(data["small_model_scale"]), source="edgellm/data/quality_priors.toml",
                         mixed=mixed_from_dict(data["mixed"]))


def prior_kld(file_type: str, n_params: int, priors: QualityPriors) -> float | None:
    """The prior for ``file_type`` (scaled for small models), None when the table has no row."""
    base = priors.kld.get(file_type)
    if base is None:
        return None
    return base * (priors.small_model_scale if n_params < priors.small_model_params else 1.0)


def expected(key: str, file_type: str, kv_type: str, *, source_type: str | None, n_params: int,
             measured: Mapping[str, float], priors: QualityPriors, predicted: Mapping[str, float] | None = None,
             prior: tuple[float, str] | None = None) -> QualityEstimate:
    """Expected KLD of candidate ``key`` (file type ``file_type``, KV cache ``kv_type``).

    ``source_type``: the file type of a GGUF source (its loss comes on top of a requantization; "SOURCE"
    keeps it as it is), None for a 16-bit checkpoint. ``predicted``: KLD from a measured loss model (mixed
    candidates priced by the converter's sensitivity measurement), by key. ``prior``: (KLD, note) replacing
    the file type's row (mixed candidates).
    """
    base_key = key.split("+kv:")[0]
    if predicted and base_key in predicted and key not in measured:
        kv = priors.kv_kld.get(kv_type, 0.0)
        return QualityEstimate(predicted[base_key] + kv, "loss model",
                               "KLD predicted by the loss model fitted to this model's measured sensitivity"
                               + (f", plus the {kv_type} KV cache prior {kv:.4f}" if kv else ""))
    if prior is not None and key not in measured:
        return QualityEstimate(prior[0] + priors.kv_kld.get(kv_type, 0.0), "prior", prior[1])
    if key in measured:
        inherited = (prior_kld(source_type, n_params, priors) or 0.0) if source_type else 0.0
        note = "KLD measured on edgellm/data/eval.txt" + (
            f" against the {source_type} source, plus its prior loss {inherited:.4f}" if source_type else "")
        return QualityEstimate(measured[key] + inherited, "measured", note)
    own = source_type if file_type == "SOURCE" else file_type
    kld = prior_kld(own or "F16", n_params, priors)
    notes = []
    if kld is None:
        kld, notes = 1.0, [f"no prior for {own}: counted as 1.0 (measure it with --measure-quality)"]
    if source_type and file_type != "SOURCE":
        inherited = prior_kld(source_type, n_params, priors) or 0.0
        kld += inherited
        notes.append(f"requantized from {source_type}: its loss ({inherited:.4f}) is added")
    kld += priors.kv_kld.get(kv_type, 0.0)
    small = n_params < priors.small_model_params
    notes.append("prior from Llama 3 8B" + (f" x{priors.small_model_scale:g} for a small model" if small else ""))
    return QualityEstimate(kld, "prior", "; ".join(notes))
