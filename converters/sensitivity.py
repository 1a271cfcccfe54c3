"""Measure what quantizing each tensor costs, then quantize a GGUF to a byte budget (``--target-size/-bpw``).

Three measurements, all on the unquantized (F16) GGUF and calibration text, feed ``allocate.solve``:

1. **Importance** (``imatrix.compute_imatrix(..., process_output=True)``): llama.cpp's importance matrix, plus the output head's
   input statistics (``output.weight``, or ``token_embd.weight`` when the embedding is tied), as
   ``llama-imatrix --process-output`` collects them. On Gemma 3 270M the tied 168M-parameter embedding is
   most of the model; quantized with these weights its error halves (KLD 0.016 -> 0.008 at Q5_1).
2. **Errors** (``quantization_errors``): per tensor and candidate type, the relative error
   ``sum_j m_j sum_i (w_ij - q_ij)^2 / sum_j m_j sum_i w_ij^2`` (m = importance), with q quantized by the very
   kernel llama.cpp's quantizer calls (``ggml_quantize_chunk``, same importance weights) on a row sample and
   dequantized by gguf-py. Rows quantize independently, so a sample estimates the whole tensor.
3. **Probes** (``measure_probes``): per tensor group (kind x layer band), quantize only that group to a probe
   type (the rest stays F16) and measure the KL divergence against the F16 model on calibration text; two more
   probes put every block weight at Q8_0 (and at Q6_K where rows allow) to price the 8-bit activation rounding
   that any quantized CPU matmul adds. ``allocate.fit_loss_model`` turns them into a gain per group and a floor
   per activation type. Relative (not absolute) errors make gains nearly constant across layers of one kind:
   on permuted Gemma 270M, absolute-error gains spread 20x across layer bands, relative ones under 2x.

``expected_loss(tensor, type) = gain(group) * (relative_error(tensor, type) + floor(type))``;
``allocate_types`` returns the loss-minimising ``Allocation`` and ``quantize_to_budget`` writes it through
llama.cpp, checks the real size and records the allocation as JSON under the GGUF key
``edgellm.quantization.allocation``.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import re
import struct
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import gguf
import numpy as np

from edgellm.converters import allocate as alloc
from edgellm.converters import imatrix as imx
from edgellm.converters import quant_types as qt
from edgellm.converters.quant_types import OUTPUT, TOKEN_EMBD, TensorInfo
from edgellm.converters.quantize import (QuantizeResult, _read_string, _read_value, capture_llama_log,
                                         quantize_gguf, read_gguf_header)
from edgellm.errors import BudgetError, ImatrixError, QuantizeError, UsageError
from edgellm.units import format_bytes

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]   # (stage, done, total)

# Candidate types, best first. All run on llama.cpp's CPU backend; a type is offered for a tensor only when its
# blocks divide the tensor's rows (k-quants need 256, the rest 32) and, for IQ3_S and below, importance data
# exists. The 2-bit IQ types are left out by default: their quantizer is 50x slower than the others.
DEFAULT_CANDIDATES = ("F16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "IQ4_XS", "IQ4_NL",
                      "Q4_0", "Q3_K", "IQ3_S", "Q2_K")
DEFAULT_PROBE = "Q5_0"          # type a group is pushed to when its gain is measured (fits any 32-wide row; near
                                # where budgets land: from Q4_0, Q5_1/Q8_0 losses came out 1.3-3x too low)
FLOOR_PROBES = {"Q8_0": "Q8_0", "Q8_K": "Q6_K"}   # activation type -> weight type probing its rounding cost
DEFAULT_BANDS = 2               # layer bands per tensor kind: groups = kinds x bands (+ embedding, output)
DEFAULT_SAMPLE_WEIGHTS = 1 << 17   # weights per tensor quantized to estimate its error (rows sampled evenly)
DEFAULT_PROBE_WINDOWS = 2       # calibration windows each probe scores
DEFAULT_PROBE_WINDOW = 128      # tokens per window, BOS included (256 gave the same allocations, slower)
DEFAULT_PROBE_SCORED = 64       # scored positions at the end of each window (logits: n_vocab floats each)
IMATRIX_KV_RESERVE = 1024       # bytes for the quantize.imatrix.* keys llama.cpp adds to the header
MAX_SIZE_RETRIES = 2            # re-solves when the written file misses the budget
LANDING = 0.01                  # a file may land at most this fraction under the budget
GGUF_TYPE_STRING = 8            # gguf_type enum
TINY = 1e-30                    # floor for errors and norms of all-zero tensors


# ---------------------------------------------------------------------------------------------------------------
# Quantization errors, through ggml's own quantizer
# ---------------------------------------------------------------------------------------------------------------

def _ggml_quantize_chunk() -> Callable[..., int]:
    """ggml_quantize_chunk(type, src f32*, dst*, start, nrows, n_per_row, imatrix f32* | NULL) -> bytes."""
    from llama_cpp import _ggml

    fn = _ggml.libggml.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    return fn


def sample_rows(n_rows: int, n_per_row: int, sample_weights: int) -> np.ndarray:
    """Evenly spaced row indices holding about ``sample_weights`` weights (all rows when the tensor is smaller)."""
    want = max(1, min(n_rows, sample_weights // max(n_per_row, 1)))
    return np.unique(np.linspace(0, n_rows - 1, want).round().astype(np.int64))


def candidate_types(info: TensorInfo, candidates: Sequence[str], has_importance: bool) -> list[str]:
    """The candidates llama.cpp can apply to this tensor: blocks divide its rows, importance data where needed."""
    exempt = info.name in TOKEN_EMBD or info.name == OUTPUT   # llama.cpp asks no importance data for these
    out = []
    for name in candidates:
        gtype = qt.ggml_type(name)
        needs = gtype.aborts_without_imatrix or (gtype.needs_imatrix and not exempt)
        if gtype.fits_row(info.ne[0]) and (has_importance or not needs):
            out.append(gtype.name)
    return out


@dataclass(frozen=True)
class TensorErrors:
    """Relative quantization errors of one tensor, per candidate type."""

    name: str
    relative: dict[str, float]    # type -> weighted squared error / weighted squared norm
    norm: float                   # sum_j m_j sum_i w_ij^2 over the sampled rows
    sampled_rows: int
    weighted: bool                # importance data was used (False: every column weighs 1)


def _tensor_errors(weights: np.ndarray, info: TensorInfo, types: Sequence[str], means: np.ndarray | None,
                   quantize_chunk: Callable[..., int]) -> TensorErrors:
    """Errors of the (rows, n_per_row) float32 sample ``weights`` of one 2-D tensor for every type in ``types``."""
    n_rows, n_per_row = weights.shape
    col_weight = means if means is not None else np.ones(n_per_row, np.float32)
    norm = float(np.einsum("ij,ij,j->", weights, weights, col_weight, dtype=np.float64))
    imatrix_ptr = means.ctypes.data if means is not None else None
    relative = {}
    for name in types:
        gtype = qt.GGML_TYPES[name]
        packed = np.empty(n_rows * gtype.row_bytes(n_per_row), np.uint8)
        written = quantize_chunk(gtype.value, weights.ctypes.data, packed.ctypes.data, 0, n_rows, n_per_row,
                                 imatrix_ptr)
        if written != packed.size:
            raise QuantizeError(path=info.name, problem=f"ggml wrote {written} bytes of {name}, {packed.size} expected")
        diff = weights - gguf.quants.dequantize(packed.reshape(n_rows, -1), gguf.GGMLQuantizationType[name])
        relative[name] = float(np.einsum("ij,ij,j->", diff, diff, col_weight, dtype=np.float64)) / max(norm, TINY)
    return TensorErrors(info.name, relative, norm, n_rows, means is not None)


@contextmanager
def _mapped(path: str | Path) -> Iterator[mmap.mmap]:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        yield buf


def _rows_f32(buf: mmap.mmap, data_start: int, info: TensorInfo, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` of an F16/F32/BF16 tensor as contiguous (len(rows), ne[0]) float32."""
    n_per_row = info.ne[0]
    dtype = {"F16": np.float16, "F32": np.float32, "BF16": np.uint16}.get(info.type)
    if dtype is None:
        raise UsageError(problem=f"{info.name} is {info.type}: errors are measured on an unquantized GGUF",
                         hint_text="start from the F16/F32/BF16 file the converter writes")
    flat = np.frombuffer(buf, dtype, info.n_elements, data_start + info.offset).reshape(-1, n_per_row)
    picked = flat[rows]
    if info.type == "BF16":
        return (picked.astype(np.uint32) << 16).view(np.float32)
    return np.ascontiguousarray(picked, dtype=np.float32)


def quantization_errors(f16_gguf: str | Path, importance: Mapping[str, np.ndarray] | None,
                        candidates: Sequence[str] = DEFAULT_CANDIDATES, *,
                        sample_weights: int = DEFAULT_SAMPLE_WEIGHTS, n_threads: int | None = None,
                        progress: Progress | None = None) -> dict[str, TensorErrors]:
    """Relative quantization error of every quantizable tensor in every candidate type it can take.

    ``importance``: name -> flat mean squares (``Imatrix.mean_squares()``); tensors without an entry are
    quantized and weighed without importance data, as llama.cpp would. 3-D (expert) tensors are not supported.

    Raises:
        UsageError: a tensor of the file is already quantized, or has more than two dimensions.
    """
    header = read_gguf_header(f16_gguf)
    tensors = [t for t in header.tensors if qt.is_quantizable(t)]
    for t in tensors:
        if t.n_dims > 2:
            raise UsageError(problem=f"{t.name} has {t.n_dims} dimensions: budgeted quantization handles dense "
                                     "models only", hint_text="quantize with a fixed --type instead")
    quantize_chunk = _ggml_quantize_chunk()
    importance = importance or {}

    def one(info: TensorInfo) -> TensorErrors:
        means = importance.get(info.name)
        means = np.ascontiguousarray(means, np.float32) if means is not None else None
        rows = sample_rows(info.n_elements // info.ne[0], info.ne[0], sample_weights)
        weights = _rows_f32(buf, header.data_start, info, rows)
        return _tensor_errors(weights, info, candidate_types(info, candidates, means is not None), means,
                              quantize_chunk)

    results: dict[str, TensorErrors] = {}
    with _mapped(f16_gguf) as buf, ThreadPoolExecutor(max_workers=n_threads or os.cpu_count() or 1) as pool:
        for i, errors in enumerate(pool.map(one, tensors)):   # ctypes drops the GIL inside ggml
            results[errors.name] = errors
            if progress is not None:
                progress("errors", i + 1, len(tensors))
    return results


# ---------------------------------------------------------------------------------------------------------------
# Probes: KL divergence caused by quantizing chosen tensors, everything else F16
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Windows:
    """Calibration windows for the probes: token lists (BOS first when the model wants one)."""

    tokens: tuple[tuple[int, ...], ...]
    scored: int               # positions scored at the end of each window

    @property
    def n_tokens(self) -> int:
        return sum(len(w) for w in self.tokens)


def calibration_windows(runtime: Any, text: str, *, n_windows: int, window: int, scored: int) -> Windows:
    """Windows from the end of ``text`` (the importance matrix reads its beginning), last ``scored`` scored."""
    prefix = runtime.tokenize("", add_special=True)
    ids = runtime.tokenize(text, add_special=False)
    step = window - len(prefix)
    n = min(n_windows, len(ids) // step)
    if n < 1:
        raise UsageError(problem=f"the calibration text has {len(ids)} tokens, fewer than one window of {window}",
                         hint_text="pass a longer calibration text")
    start = len(ids) - n * step
    tokens = tuple(tuple(prefix + ids[start + i * step:start + (i + 1) * step]) for i in range(n))
    return Windows(tokens, min(scored, step - 1))


def _window_logprobs(model_path: str | Path, windows: Windows, n_threads: int | None) -> np.ndarray:
    """(n_windows * scored, n_vocab) float32 log-probabilities of a model at the scored positions."""
    from edgellm.evaluate import log_softmax
    from edgellm.runtime import Runtime

    width = max(len(w) for w in windows.tokens)
    runtime = Runtime.load(model_path, n_ctx=width, n_threads=n_threads, n_threads_batch=n_threads)
    try:
        rows = []
        for tokens in windows.tokens:
            runtime.reset()
            positions = list(range(len(tokens) - windows.scored, len(tokens)))
            rows.append(log_softmax(runtime.logits(list(tokens), positions=positions)))
        return np.concatenate(rows)
    finally:
        runtime.close()


def probe_type(names: Sequence[str], errors: Mapping[str, TensorErrors], preferred: str = DEFAULT_PROBE) -> str:
    """``preferred`` when every tensor of the group can take it, else the fewest-bits type they all can take."""
    shared = set.intersection(*(set(errors[n].relative) for n in names))
    if preferred in shared:
        return preferred
    return min(shared, key=lambda t: (qt.GGML_TYPES[t].bits_per_weight, t))


def tensor_groups(tensors: Sequence[TensorInfo], n_layers: int, bands: int) -> dict[str, list[str]]:
    """Group name -> tensor names, in file order (see ``allocate.tensor_group``)."""
    groups: dict[str, list[str]] = {}
    for t in tensors:
        groups.setdefault(alloc.tensor_group(t.name, n_layers, bands), []).append(t.name)
    return groups


def probe_plan(groups: Mapping[str, Sequence[str]], errors: Mapping[str, TensorErrors], probe: str = DEFAULT_PROBE
               ) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """(group probes, activation-floor probes) as tensor -> type maps.

    One probe per group: its tensors in ``probe`` (or the closest type they all take). Floor probes: every block
    weight at Q8_0, and every block weight that takes k-quants at Q6_K, when any does: little weight error, so
    their KLD is mostly what 8-bit activations cost (see ``allocate.fit_loss_model``).
    """
    group_probes = {g: {n: probe_type(names, errors, probe) for n in names} for g, names in groups.items()}
    blocks = [n for names in groups.values() for n in names if alloc.is_block_tensor(n)]
    floors = {"Q8_0": {n: FLOOR_PROBES["Q8_0"] for n in blocks if FLOOR_PROBES["Q8_0"] in errors[n].relative},
              "Q8_K": {n: FLOOR_PROBES["Q8_K"] for n in blocks if FLOOR_PROBES["Q8_K"] in errors[n].relative}}
    return group_probes, {family: types for family, types in floors.items() if types}


def measure_probes(f16_gguf: str | Path, probes: Mapping[str, Mapping[str, str]], importance: imx.Imatrix | None,
                   text: str, *, n_windows: int = DEFAULT_PROBE_WINDOWS, window: int = DEFAULT_PROBE_WINDOW,
                   scored: int = DEFAULT_PROBE_SCORED, n_threads: int | None = None, work_dir: str | Path | None = None,
                   progress: Progress | None = None) -> tuple[dict[str, alloc.Probe], Windows]:
    """KLD against ``f16_gguf`` of each probe (label -> tensor -> type; every other tensor stays F16).

    One reference scoring run, then per probe a llama.cpp quantization into ``work_dir`` (default: next to
    ``f16_gguf``) and a scoring run over the calibration windows.
    """
    from edgellm.evaluate import kl_divergence
    from edgellm.runtime import Runtime

    reference_rt = Runtime.load(f16_gguf, n_ctx=window, n_threads=n_threads, n_threads_batch=n_threads)
    try:
        windows = calibration_windows(reference_rt, text, n_windows=n_windows, window=window, scored=scored)
    finally:
        reference_rt.close()
    reference = _window_logprobs(f16_gguf, windows, n_threads)
    measured = {}
    with tempfile.TemporaryDirectory(prefix=".edgellm-probes-", dir=work_dir or Path(f16_gguf).parent) as tmp:
        probed = Path(tmp) / "probe.gguf"
        for i, (label, types) in enumerate(probes.items()):
            overrides = {**{f"^{re.escape(n)}$": t for n, t in types.items()}, ".*": "F16"}   # first match wins
            quantize_gguf(f16_gguf, probed, "Q8_0", imatrix=importance, overrides=overrides, n_threads=n_threads)
            kld = kl_divergence(reference, _window_logprobs(probed, windows, n_threads))
            measured[label] = alloc.Probe(label, dict(types), float(kld.mean()),
                                          float(kld.std(ddof=1) / np.sqrt(len(kld))))
            log.info("probe %-16s (%d tensors): KLD %.5f +- %.5f", label, len(types), measured[label].kld,
                     measured[label].kld_stderr)
            if progress is not None:
                progress("probes", i + 1, len(probes))
    return measured, windows


# ---------------------------------------------------------------------------------------------------------------
# Allocation and quantization to a budget
# ---------------------------------------------------------------------------------------------------------------

def _n_layers(header_metadata: Mapping[str, object], tensors: Sequence[TensorInfo]) -> int:
    arch = header_metadata.get("general.architecture")
    value = header_metadata.get(f"{arch}.block_count")
    if isinstance(value, int):
        return value
    layers = {int(t.name.split(".")[1]) for t in tensors if t.name.startswith("blk.")}
    return max(layers) + 1 if layers else 1


def fixed_bytes(f16_gguf: str | Path, json_bytes: int) -> int:
    """Bytes of the output that no type choice changes: header (+ our JSON key), unquantized tensors."""
    header = read_gguf_header(f16_gguf)
    alignment = int(header.metadata.get("general.alignment", alloc.GGUF_ALIGNMENT))   # type: ignore[arg-type]
    kept = sum(alloc.padded(t.n_bytes, alignment) for t in header.tensors if not qt.is_quantizable(t))
    return header.data_start + kept + IMATRIX_KV_RESERVE + alloc.padded(_kv_bytes(alloc.METADATA_KEY, json_bytes))


def _kv_bytes(key: str, value_len: int) -> int:
    """Bytes of one GGUF string key-value pair: key (u64 length + bytes), u32 type, value (u64 length + bytes)."""
    return 8 + len(key.encode()) + 4 + 8 + value_len


def size_bounds(f16_gguf: str | Path, candidates: Sequence[str] = DEFAULT_CANDIDATES) -> tuple[int, int]:
    """(smallest, largest) file the candidate types can make of ``f16_gguf``, from its header alone."""
    header = read_gguf_header(f16_gguf)
    alignment = int(header.metadata.get("general.alignment", alloc.GGUF_ALIGNMENT))   # type: ignore[arg-type]
    sizes = [[alloc.tensor_bytes(t.ne, c, alignment) for c in candidate_types(t, candidates, True)]
             for t in header.tensors if qt.is_quantizable(t)]
    fixed = fixed_bytes(f16_gguf, 0)
    return fixed + sum(min(s) for s in sizes), fixed + sum(max(s) for s in sizes)


def check_budget(f16_gguf: str | Path, budget_bytes: int, candidates: Sequence[str] = DEFAULT_CANDIDATES,
                 budget_label: str | None = None) -> None:
    """Refuse a budget below the smallest possible file before anything is measured.

    Raises:
        BudgetError: naming the smallest size.
    """
    low, _ = size_bounds(f16_gguf, candidates)
    if budget_bytes < low:
        raise BudgetError(budget=budget_label or format_bytes(budget_bytes),
                          problem=f"the smallest types its tensors can take ({', '.join(candidates[-3:])}...) "
                                  f"give {format_bytes(low)}",
                          hint_text=f"ask for at least {format_bytes(low)}, or a smaller model")


def budget_for_bpw(f16_gguf: str | Path, bits_per_weight: float) -> int:
    """The file budget meaning ``bits_per_weight`` bits of tensor data per weight, as llama.cpp counts bpw."""
    header = read_gguf_header(f16_gguf)
    n_weights = sum(t.n_elements for t in header.tensors)
    return int(bits_per_weight * n_weights / 8) + (header.data_start + IMATRIX_KV_RESERVE)


def _importance(imatrix: imx.Imatrix | str | Path | None, f16_gguf: str | Path, text: str | None,
                n_threads: int | None) -> imx.Imatrix:
    if imatrix is None or str(imatrix) == "auto":
        return imx.compute_imatrix(f16_gguf, text, n_threads=n_threads, process_output=True)
    if isinstance(imatrix, imx.Imatrix):
        return imatrix
    return imx.load_imatrix(imatrix)


@dataclass(frozen=True)
class Sensitivity:
    """Everything measured on one F16 GGUF: reusable for any number of budgets."""

    f16_gguf: str
    importance: imx.Imatrix                 # quantize with this one: the errors were measured with it
    errors: dict[str, TensorErrors]
    probes: dict[str, alloc.Probe]          # group probes by group name, floor probes as "floor:<activation type>"
    model: alloc.LossModel
    options: tuple[alloc.TensorOptions, ...]   # per quantizable tensor, in file order
    measurements: dict[str, Any]           # how (tokens, runs, seconds, per-group numbers), for the record


def measure_sensitivity(f16_gguf: str | Path, *, imatrix: imx.Imatrix | str | Path | None = "auto",
                        calibration_text: str | None = None, candidates: Sequence[str] = DEFAULT_CANDIDATES,
                        bands: int = DEFAULT_BANDS, probe: str = DEFAULT_PROBE,
                        sample_weights: int = DEFAULT_SAMPLE_WEIGHTS, probe_windows: int = DEFAULT_PROBE_WINDOWS,
                        n_threads: int | None = None, work_dir: str | Path | None = None,
                        progress: Progress | None = None) -> Sensitivity:
    """Importance, per-tensor errors, probes and the fitted loss model of ``f16_gguf`` (see the module docstring).

    ``imatrix``: an ``Imatrix``, a file, or ``"auto"``/None (computed with the output head on the calibration
    text, the bundled one when ``calibration_text`` is None). Costs one importance pass, the error estimates,
    and ``groups + 3`` short scoring runs (reference, group probes, two activation-floor probes).

    Raises:
        ImatrixError, ModelLoadError, QuantizeError, UsageError.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    importance = _importance(imatrix, f16_gguf, calibration_text, n_threads)
    timings["importance"] = time.perf_counter() - started
    header = read_gguf_header(f16_gguf)
    tensors = [t for t in header.tensors if qt.is_quantizable(t)]
    started = time.perf_counter()
    errors = quantization_errors(f16_gguf, importance.mean_squares(), candidates, sample_weights=sample_weights,
                                 n_threads=n_threads, progress=progress)
    timings["errors"] = time.perf_counter() - started
    n_layers = _n_layers(header.metadata, tensors)
    groups = tensor_groups(tensors, n_layers, bands)
    group_types, floor_types = probe_plan(groups, errors, probe)
    started = time.perf_counter()
    text = imx.default_calibration_text() if calibration_text is None else calibration_text
    measured, windows = measure_probes(f16_gguf, {**group_types, **{f"floor:{f}": t for f, t in floor_types.items()}},
                                       importance, text, n_windows=probe_windows, n_threads=n_threads,
                                       work_dir=work_dir, progress=progress)
    timings["probes"] = time.perf_counter() - started
    relative = {n: e.relative for n, e in errors.items()}
    group_of = {n: g for g, names in groups.items() for n in names}
    model = alloc.fit_loss_model({g: measured[g] for g in groups}, {f: measured[f"floor:{f}"] for f in floor_types},
                                 relative, group_of)
    if not any(measured[g].kld > 0 for g in groups):
        log.warning("no probe changed the calibration logits measurably: types follow quantization error alone")
    alignment = int(header.metadata.get("general.alignment", alloc.GGUF_ALIGNMENT))   # type: ignore[arg-type]
    options = tuple(alloc.tensor_options(t.name, group_of[t.name], t.ne,
                                         {ty: model.loss(t.name, ty, err) for ty, err in relative[t.name].items()},
                                         alignment) for t in tensors)
    record = _measurements(importance, errors, measured, model, windows, timings, sample_weights)
    return Sensitivity(str(f16_gguf), importance, errors, measured, model, options, record)


def allocate_types(f16_gguf: str | Path, budget_bytes: int, *, imatrix: imx.Imatrix | str | Path | None = "auto",
                   calibration_text: str | None = None, sensitivity: Sensitivity | None = None,
                   budget_label: str | None = None, **measure_options: Any) -> alloc.Allocation:
    """Choose one type per quantizable tensor of ``f16_gguf`` so the file fits ``budget_bytes`` with the least
    expected KL divergence; measures the sensitivity first unless ``sensitivity`` is given (see
    ``measure_sensitivity`` for ``imatrix``, ``calibration_text`` and ``measure_options``).

    Raises:
        BudgetError: the budget is below the smallest file the candidate types can make.
        ImatrixError, ModelLoadError, QuantizeError, UsageError: from the measurements.
    """
    if sensitivity is None:
        check_budget(f16_gguf, budget_bytes, measure_options.get("candidates", DEFAULT_CANDIDATES), budget_label)
        sensitivity = measure_sensitivity(f16_gguf, imatrix=imatrix, calibration_text=calibration_text,
                                          **measure_options)
    return _solve_with_record(f16_gguf, sensitivity.options, budget_bytes, sensitivity.measurements, budget_label)


def _measurements(importance: imx.Imatrix, errors: Mapping[str, TensorErrors], probes: Mapping[str, alloc.Probe],
                  model: alloc.LossModel, windows: Windows, timings: Mapping[str, float],
                  sample_weights: int) -> dict[str, Any]:
    """The record of how the losses were measured (stored with the allocation)."""
    r = alloc.rounded
    relative = {n: e.relative for n, e in errors.items()}
    return {
        "method": "expected KLD = gain(group) x (relative importance-weighted error + activation floor)",
        "importance_tokens": importance.n_tokens,
        "head_importance": sorted(imx.HEAD_TENSORS & set(importance.sums)),
        "error_sample_weights": sample_weights,
        "probe_runs": len(probes) + 1,
        "probe_tokens": windows.n_tokens,
        "probe_scored_positions": windows.scored * len(windows.tokens),
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "floors": {f: r(v) for f, v in model.floors.items()},
        "probes": {label: {"types": sorted(set(p.types.values())), "tensors": len(p.types), "kld": r(p.kld),
                           "kld_stderr": r(p.kld_stderr), "predicted": r(alloc.predicted_kld(model, p.types, relative)),
                           **({"gain": r(model.gains[label])} if label in model.gains else {})}
                   for label, p in probes.items()},
        "unweighted_tensors": sorted(n for n, e in errors.items() if not e.weighted),
    }


def _solve_with_record(f16_gguf: str | Path, options: Sequence[alloc.TensorOptions], budget_bytes: int,
                       measurements: Mapping[str, Any], budget_label: str | None) -> alloc.Allocation:
    """Solve with room for the JSON record itself: once with an estimate, again if the record came out larger."""
    reserve = 0
    for _ in range(3):
        allocation = alloc.solve(options, budget_bytes, fixed_bytes(f16_gguf, reserve), budget_label=budget_label)
        allocation = replace(allocation, measurements=dict(measurements))
        size = len(allocation.to_json().encode())
        if size <= reserve:
            return allocation
        reserve = size + size // 8   # the record's length depends a little on the choices
    return allocation


def quantize_to_budget(f16_gguf: str | Path, dst_gguf: str | Path, budget_bytes: int, *,
                       imatrix: imx.Imatrix | str | Path | None = "auto", calibration_text: str | None = None,
                       sensitivity: Sensitivity | None = None, n_threads: int | None = None,
                       budget_label: str | None = None, progress: Progress | None = None,
                       **measure_options: Any) -> tuple[QuantizeResult, alloc.Allocation]:
    """Quantize ``f16_gguf`` into ``dst_gguf`` with the types ``allocate_types`` chooses for ``budget_bytes``.

    llama.cpp writes the file with one exact-name override per tensor and the measured importance matrix; the
    file is then copied with the allocation's JSON record added under ``edgellm.quantization.allocation``. If
    its real size misses the prediction (llama.cpp's header differs a little from the estimate) the allocation
    is solved again with the corrected header bytes, so the file lands within 1% under the budget.

    Returns:
        (QuantizeResult of the final file, the Allocation it holds).

    Raises:
        BudgetError, ImatrixError, ModelLoadError, QuantizeError, UsageError.
    """
    dst = Path(dst_gguf)
    if sensitivity is None:
        check_budget(f16_gguf, budget_bytes, measure_options.get("candidates", DEFAULT_CANDIDATES), budget_label)
        sensitivity = measure_sensitivity(f16_gguf, imatrix=imatrix, calibration_text=calibration_text,
                                          n_threads=n_threads, work_dir=dst.parent, progress=progress,
                                          **measure_options)
    importance = sensitivity.importance
    allocation = _solve_with_record(f16_gguf, sensitivity.options, budget_bytes, sensitivity.measurements,
                                    budget_label)
    options = [alloc.TensorOptions(c.name, c.group, 0, c.alternatives) for c in allocation.choices]
    for attempt in range(MAX_SIZE_RETRIES + 1):
        result = _write_allocated(f16_gguf, dst, allocation, importance, n_threads, progress)
        # the header llama.cpp writes differs a little from the estimate: correct the fixed bytes and re-solve
        fixed = allocation.fixed_bytes + result.size_bytes - allocation.total_bytes
        resolved = _resolve(options, budget_bytes, fixed, allocation, budget_label)
        fits = result.size_bytes <= budget_bytes
        if fits and (resolved.types == allocation.types or budget_bytes - result.size_bytes <= LANDING * budget_bytes):
            return result, replace(allocation, fixed_bytes=fixed)
        if attempt == MAX_SIZE_RETRIES or resolved.types == allocation.types:
            if not fits:
                dst.unlink(missing_ok=True)
                raise BudgetError(budget=budget_label or format_bytes(budget_bytes),
                                  problem=f"llama.cpp wrote {format_bytes(result.size_bytes)} after {attempt} "
                                          "corrections", hint_text="ask for a slightly larger size")
            return result, replace(allocation, fixed_bytes=fixed)
        log.info("file of %d bytes for a budget of %d: solving again with corrected header bytes",
                 result.size_bytes, budget_bytes)
        allocation = resolved
    raise AssertionError("unreachable")


def _resolve(options: Sequence[alloc.TensorOptions], budget_bytes: int, fixed: int, previous: alloc.Allocation,
             budget_label: str | None) -> alloc.Allocation:
    return replace(alloc.solve(options, budget_bytes, fixed, budget_label=budget_label),
                   measurements=previous.measurements)


def _write_allocated(f16_gguf: str | Path, dst: Path, allocation: alloc.Allocation, importance: imx.Imatrix,
                     n_threads: int | None, progress: Progress | None) -> QuantizeResult:
    """llama.cpp quantization with the allocation's overrides, checked, then the record added; returns the result."""
    staged = dst.with_name(f".{dst.name}.allocated")

    def relay(done: int, total: int, _name: str) -> None:
        if progress is not None:
            progress("quantize", done, total)

    try:
        result = quantize_gguf(f16_gguf, staged, allocation.base_file_type(), imatrix=importance,
                               overrides=allocation.overrides(), n_threads=n_threads, progress=relay)
        _check_types(staged, allocation)
        add_string_metadata(staged, dst, alloc.METADATA_KEY, allocation.to_json())
    finally:
        staged.unlink(missing_ok=True)
    size = dst.stat().st_size
    return replace(result, path=dst, size_bytes=size)


def _check_types(path: Path, allocation: alloc.Allocation) -> None:
    """The written tensors carry the chosen types (llama.cpp may not substitute any)."""
    written = {t.name: t.type for t in read_gguf_header(path).tensors}
    wrong = [f"{c.name} is {written.get(c.name)}, not {c.type}" for c in allocation.choices
             if written.get(c.name) != c.type]
    if wrong:
        raise QuantizeError(path=str(path), problem="llama.cpp did not apply the allocation: " + "; ".join(wrong[:3]))


# ---------------------------------------------------------------------------------------------------------------
# Adding one string to a GGUF header
# ---------------------------------------------------------------------------------------------------------------

def _header_layout(buf: mmap.mmap) -> tuple[int, int, int, int, int]:
    """(n_kv, end of the key-value section, end of the tensor infos, data start, alignment) of a GGUF file."""
    _version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    pos, alignment = 24, alloc.GGUF_ALIGNMENT
    for _ in range(n_kv):
        key, pos = _read_string(buf, pos)
        (vtype,), pos = struct.unpack_from("<I", buf, pos), pos + 4
        value, pos = _read_value(buf, pos, vtype)
        if key == "general.alignment":
            alignment = int(value)   # type: ignore[arg-type]
    kv_end = pos
    for _ in range(n_tensors):
        _, pos = _read_string(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        pos += 4 + 8 * n_dims + 4 + 8   # n_dims, ne[], type, offset
    return n_kv, kv_end, pos, -(-pos // alignment) * alignment, alignment


def add_string_metadata(src: str | Path, dst: str | Path, key: str, value: str, chunk: int = 1 << 24) -> None:
    """Copy the GGUF ``src`` to ``dst`` with one more string key-value pair, written via ``dst.partial``.

    Tensor data offsets count from the data section, which moves as a whole and stays aligned, so the tensor
    infos are copied unchanged.
    """
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".partial")
    with _mapped(src) as buf:
        n_kv, kv_end, infos_end, data_start, alignment = _header_layout(buf)
        encoded_key, encoded_value = key.encode(), value.encode()
        pair = (struct.pack("<Q", len(encoded_key)) + encoded_key
                + struct.pack("<IQ", GGUF_TYPE_STRING, len(encoded_value)) + encoded_value)
        head = buf[:16] + struct.pack("<Q", n_kv + 1) + buf[24:kv_end] + pair + buf[kv_end:infos_end]
        head += b"\0" * (-len(head) % alignment)
        try:
            with open(tmp, "wb") as out:
                out.write(head)
                for at in range(data_start, len(buf), chunk):
                    out.write(buf[at:at + chunk])
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)


def read_allocation(gguf_path: str | Path) -> alloc.Allocation | None:
    """The allocation recorded in a GGUF written by ``quantize_to_budget``, or None."""
    value = read_gguf_header(gguf_path).metadata.get(alloc.METADATA_KEY)
    return alloc.Allocation.from_json(value) if isinstance(value, str) else None
