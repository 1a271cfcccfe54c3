"""Layer pruning (``--allow-prune``): drop whole transformer blocks, the ones whose removal costs least.

Pruning is far riskier than quantization, so a pruned candidate's quality is never a prior: ``measure_pruning``
(I/O) scores the 16-bit model with each block removed on the shipped evaluation text (KL divergence against
the full model), removes blocks cheapest first, and measures each pruned model it offers. The planner (pure)
sizes a pruned candidate with ``drop_layers`` (the facts of the smaller model) and adds the quantization prior
of its file type on top of the measured pruning loss. ``write_pruned`` writes a GGUF without the blocks
(tensors renumbered, ``block_count`` and per-layer metadata arrays shortened); llama.cpp then quantizes it.

Not offered for architectures whose sliding-window layers llama.cpp derives from the layer index
(``facts.LLAMA_CPP_SWA``): removing a block would shift every later layer's window.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

from edgellm.fitting.facts import LLAMA_CPP_SWA, ModelFacts, TensorFact

logger = logging.getLogger(__name__)

PREFIX = "PRUNE"                  # candidate label: "<file type>-PRUNE<k>"
MAX_SHARE = 0.25                  # at most this share of the blocks is ever dropped
SCORE_TOKENS = 256                # evaluation tokens per single-block score (ranking only)
MEASURE_TOKENS = 1024             # evaluation tokens for each offered pruned model
EVAL_N_CTX = 512
PRUNED_TYPES = ("Q8_0", "Q4_K_M", "Q4_0")   # file types pruned models are offered in
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Pruning:
    """A measured pruned model: the blocks dropped (original indices) and its KLD against the full model."""

    drop: tuple[int, ...]
    kld: float
    costs: Mapping[int, float]    # every block's single-removal KLD (how the drop set was chosen)

    @property
    def label(self) -> str:
        return f"{PREFIX}{len(self.drop)}"


def not_prunable(facts: ModelFacts) -> str | None:
    """Why ``facts`` cannot be pruned (None when it can)."""
    if facts.source_format != "hf" and facts.source_type not in ("F16", "BF16", "F32"):
        return f"the source is a {facts.source_type} GGUF: blocks are dropped from 16-bit weights"
    if facts.shape.architecture in LLAMA_CPP_SWA and facts.shape.n_swa_layers:
        return (f"llama.cpp derives {facts.shape.architecture}'s sliding-window layers from their index: dropping a "
                "block would change every later layer's attention")
    if max_drop(facts) < 1:
        return "the model has too few blocks to drop any"
    return None


def max_drop(facts: ModelFacts) -> int:
    return int(facts.shape.n_layers * MAX_SHARE) or (1 if facts.shape.n_layers > 1 else 0)


def renumber(name: str, keep: Mapping[int, int]) -> str | None:
    """The tensor's name once the blocks not in ``keep`` (old -> new index) are dropped; None when dropped."""
    match = _BLOCK.match(name)
    if not match:
        return name
    new = keep.get(int(match[1]))
    return None if new is None else f"blk.{new}.{match[2]}"


def _keep(n_layers: int, drop: Sequence[int]) -> dict[int, int]:
    kept = [i for i in range(n_layers) if i not in set(drop)]
    return {old: new for new, old in enumerate(kept)}


def drop_layers(facts: ModelFacts, drop: Sequence[int]) -> ModelFacts:
    """The facts of ``facts`` without the blocks ``drop`` (pure): tensors renumbered, shape shortened. The
    full model's dry-run recipes are dropped: llama.cpp's type rules depend on the layer count, so the pruned
    model's types come from the rules table."""
    keep = _keep(facts.shape.n_layers, drop)
    tensors = tuple(TensorFact(new, t.ne, t.type) for t in facts.tensors if (new := renumber(t.name, keep)))
    shape = replace(facts.shape, n_layers=len(keep), swa_layers=tuple(facts.shape.swa_layers[i] for i in keep))
    return replace(facts, tensors=tensors, shape=shape, recipes={})


def order_by_cost(costs: Mapping[int, float]) -> list[int]:
    """Blocks cheapest to remove first (ties: the later block)."""
    return sorted(costs, key=lambda i: (costs[i], -i))


# ------------------------------------------------------------------------------------------------ I/O

def write_pruned(src: str | Path, dst: str | Path, drop: Sequence[int]) -> None:
    """Write the float GGUF ``src`` without the blocks ``drop`` to ``dst`` (atomically)."""
    import gguf

    from edgellm.converters.writer import GGUFWriter   # packs the vocabulary arrays in one call each

    reader = gguf.GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    n_layers = int(reader.fields[f"{arch}.block_count"].contents())
    keep = _keep(n_layers, drop)
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".partial")
    writer = GGUFWriter(tmp, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.alignment"):
            continue
        value, vtype = field.contents(), field.types[0]
        if field.name == f"{arch}.block_count":
            value = len(keep)
        elif vtype == gguf.GGUFValueType.ARRAY and field.name.startswith(arch + ".") and len(value) == n_layers:
            value = [value[i] for i in keep]          # per-layer hyperparameters
        writer.add_key_value(field.name, value, vtype, sub_type=field.types[-1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        name = renumber(t.name, keep)
        if name is not None:
            writer.add_tensor(name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)


def _kld(model: Path, reference: Path, max_tokens: int) -> float:
    from edgellm.evaluate import evaluate

    return evaluate(model, reference=reference, n_ctx=EVAL_N_CTX, max_tokens=max_tokens).comparison.kld_mean


def measure_pruning(facts: ModelFacts, f16_gguf: Path, work: Path, *, counts: Sequence[int] | None = None,
                    score_tokens: int = SCORE_TOKENS, measure_tokens: int = MEASURE_TOKENS) -> list[Pruning]:
    """Score every block's removal, then measure the pruned models dropping the cheapest 1..``max_drop``
    blocks (or ``counts``). Costs one short evaluation per block and one longer one per offered model."""
    costs = {}
    for i in range(facts.shape.n_layers):
        path = work / f"without-{i}.gguf"
        write_pruned(f16_gguf, path, [i])
        costs[i] = _kld(path, f16_gguf, score_tokens)
        path.unlink()
        logger.info("without block %d: KLD %.4f", i, costs[i])
    order = order_by_cost(costs)
    out = []
    for k in counts or range(1, max_drop(facts) + 1):
        drop = tuple(sorted(order[:k]))
        path = work / f"pruned-{k}.gguf"
        write_pruned(f16_gguf, path, drop)
        out.append(Pruning(drop, _kld(path, f16_gguf, measure_tokens), dict(costs)))
        path.unlink()
        logger.info("without blocks %s: KLD %.4f", drop, out[-1].kld)
    return out


def measured_prunings(facts: ModelFacts) -> list[Pruning]:
    """``measure_pruning`` on the 16-bit form of the source (a checkpoint is converted to F16 first)."""
    with tempfile.TemporaryDirectory(prefix="edgellm-prune-") as tmp:
        work = Path(tmp)
        f16 = Path(facts.source)
        if facts.source_format == "hf":
            from edgellm.converters import convert
            f16 = work / "f16.gguf"
            convert(facts.source, f16, type="f16")
        return measure_pruning(facts, f16, work)
