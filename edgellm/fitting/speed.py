"""Speed model: decode and prefill tokens per second of a candidate on a device profile. Pure.

Decode reads every weight once per token (the tied embedding too, as the output matrix; an untied input
embedding only one row) plus the KV cache up to the current depth. Per weight type the time is the slower
of reading its bytes at the backend's effective bandwidth and running its dot-product kernel on the CPU
threads (small models on few cores are compute-bound: measured here, Q4_K_M decodes at half F32's
bandwidth). Fixed costs per token (graph, launches per layer on GPUs, the Python sampler per vocabulary
entry) come on top. Prefill is a compute roofline: 2 FLOP per weight per token at a fraction of peak.

The coefficients are data (``edgellm/data/efficiency.toml``) chosen per backend and device class, and a
device's own measurements can replace them (``Calibration``; ``fit --device local`` reads one when present).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from edgellm.fitting.facts import ModelShape, TensorFact
from edgellm.fitting.memory import Settings, kv_row_bytes, pad
from edgellm.fitting.quant import Recipe
from edgellm.targets.schema import DeviceProfile

KV_READ_PAD = 256                         # llama.cpp reads the cache in 256-cell steps (get_n_kv)
DEFAULT_CLOCK_HZ = {"x86_64": 3.0e9, "aarch64": 2.0e9}   # when a profile does not know its clock (0 Hz)
FLOP_PER_WEIGHT = 2                       # one multiply-add per weight per token


@dataclass(frozen=True)
class Efficiency:
    """One row of the efficiency table: how close a backend gets to a device's peaks."""

    backend: str
    device_class: str                     # or "*" for any
    bandwidth: float                      # fraction of memory.bandwidth bytes-bound decode kernels reach
    prefill: float                        # fraction of peak FLOP/s prefill reaches
    per_token_s: float = 0.0              # graph build and bookkeeping per decoded token
    per_layer_s: float = 0.0              # kernel launches and syncs per layer per token (GPUs)
    per_vocab_s: float = 0.0              # logits copy and sampling in the Python runtime, per vocabulary entry
    cpu_bound: bool = True                # the CPU kernel cost applies (CPU backends)
    source: str = ""


@dataclass(frozen=True)
class SpeedTables:
    """The efficiency rows, CPU kernel costs (cycles per weight per core, by ISA then ggml type) and peak
    FLOP per cycle per core (by ISA feature)."""

    efficiency: tuple[Efficiency, ...]
    cpu_cycles: Mapping[str, Mapping[str, float]]
    flops_per_cycle: Mapping[str, float]
    source: str = ""

    def row(self, backend: str, device_class: str) -> Efficiency:
        """The most specific row: exact class first, then "*". Raises KeyError when the backend has none."""
        rows = [r for r in self.efficiency if r.backend == backend and r.device_class in (device_class, "*")]
        if not rows:
            raise KeyError(backend)
        return min(rows, key=lambda r: r.device_class == "*")


@dataclass(frozen=True)
class Calibration:
    """Measured replacements for one device (written by ``edgellm bench``, read by ``fit --device local``)."""

    device: str                           # profile id the numbers belong to ("local" for this machine)
    efficiency: tuple[Efficiency, ...] = ()
    cpu_cycles: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    source: str = ""
    path: str = ""                        # the file it was read from (shown by fit), "" when not from a file

    def to_dict(self) -> dict[str, Any]:
        """What fit reports about the calibration it used."""
        return {"device": self.device, "source": self.source, "path": self.path,
                "cpu_cycles": {isa: dict(c) for isa, c in self.cpu_cycles.items()},
                "efficiency": [asdict(r) for r in self.efficiency]}


def apply_calibration(tables: SpeedTables, calibration: Calibration | None) -> SpeedTables:
    """``tables`` with the calibration's rows and kernel costs taking precedence."""
    if calibration is None:
        return tables
    keys = {(r.backend, r.device_class) for r in calibration.efficiency}
    rows = calibration.efficiency + tuple(r for r in tables.efficiency if (r.backend, r.device_class) not in keys)
    cycles = {isa: {**tables.cpu_cycles.get(isa, {}), **calibration.cpu_cycles.get(isa, {})}
              for isa in set(tables.cpu_cycles) | set(calibration.cpu_cycles)}
    return replace(tables, efficiency=rows, cpu_cycles=cycles,
                   source=f"{tables.source}; calibrated: {calibration.source or calibration.device}")


@dataclass(frozen=True)
class SpeedEstimate:
    decode_tokens_per_s: float            # at a short context (llama-bench tg)
    decode_tokens_per_s_full: float       # with the context full
    prefill_tokens_per_s: float
    bytes_per_token: int                  # weight bytes read per decoded token
    bound: str                            # "bandwidth", "compute" or "overhead": the largest term
    basis: str                            # which efficiency row and clock were used

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Device:
    """The device facts the speed model needs, from a profile and the plan's threads."""

    bandwidth: float                      # bytes/s
    clock_hz: float
    isa: str                              # "x86_64" or "aarch64"
    features: frozenset[str]
    threads: int
    clock_known: bool


def device_facts(profile: DeviceProfile, threads: int) -> Device:
    """Bandwidth, the clock of the fastest cluster (a default when unknown) and the ISA of ``profile``."""
    clock = max((c.max_clock for c in profile.cpu.clusters), default=0.0)
    known = clock > 0
    return Device(bandwidth=profile.memory.bandwidth, clock_hz=clock if known else DEFAULT_CLOCK_HZ[profile.cpu.arch],
                  isa=profile.cpu.arch, features=frozenset(profile.cpu.features), threads=max(threads, 1),
                  clock_known=known)


def on_gpu(tensor: TensorFact, gpu_layers: int, n_layers: int) -> bool:
    """Whether llama.cpp puts ``tensor`` on the GPU with ``gpu_layers`` offloaded (the output layer goes
    with the last one; the input embedding never does, but a tied one is duplicated as the output)."""
    if tensor.layer is not None:
        return tensor.layer < gpu_layers
    return gpu_layers >= n_layers > 0 and tensor.name in ("output.weight", "output_norm.weight", "token_embd.weight")


def read_per_token(tensors: tuple[TensorFact, ...], types: Recipe, tied: bool, gpu_layers: int, n_layers: int,
                   gpu: bool) -> dict[str, tuple[int, int]]:
    """ggml type -> (bytes, weights) read per decoded token on the GPU (``gpu``) or the CPU side."""
    out: dict[str, tuple[int, int]] = {}
    for t in tensors:
        if t.name == "token_embd.weight" and not tied:
            continue                       # get_rows reads one row per token
        if on_gpu(t, gpu_layers, n_layers) != gpu:
            continue
        kind = types[t.name]
        b, n = out.get(kind, (0, 0))
        out[kind] = (b + t.bytes_as(kind), n + t.n_elements)
    return out


def kv_read_bytes(shape: ModelShape, s: Settings, depth: int, layers: range | None = None) -> int:
    """KV bytes attention reads for one token at ``depth`` (every cell up to it; windows cap SWA caches)."""
    cells = pad(max(depth, 1), KV_READ_PAD)
    total = 0
    for layer in range(shape.n_layers) if layers is None else layers:
        window = shape.swa_layers[layer] and not s.swa_full and shape.sliding_window
        n = min(cells, pad(shape.sliding_window + s.n_ubatch, KV_READ_PAD)) if window else cells
        total += min(n, s.n_ctx_padded) * kv_row_bytes(shape, s.kv_type)
    return total


def _weight_seconds(reads: Mapping[str, tuple[int, int]], dev: Device, eff: Efficiency,
                    cycles: Mapping[str, float]) -> tuple[float, float, float]:
    """(time, bandwidth part, compute part) to stream and multiply the weights of one token."""
    total, mem_total, cpu_total = 0.0, 0.0, 0.0
    bw = dev.bandwidth * eff.bandwidth
    for kind, (nbytes, nweights) in reads.items():
        t_mem = nbytes / bw
        t_cpu = nweights * cycles.get(kind, max(cycles.values(), default=0.0)) / (dev.threads * dev.clock_hz)
        t_cpu = t_cpu if eff.cpu_bound else 0.0
        total += max(t_mem, t_cpu)
        mem_total, cpu_total = mem_total + t_mem, cpu_total + t_cpu
    return total, mem_total, cpu_total


def peak_flops(profile: DeviceProfile, dev: Device, tables: SpeedTables, gpu: bool) -> float:
    """Peak FLOP/s for prefill: the accelerator's INT8 ops when the model runs there, else the CPU's."""
    if gpu:
        ops = [a.int8_ops for a in profile.accelerators if a.kind == "gpu" and a.int8_ops]
        if ops:
            return max(ops)
    per_cycle = max((v for k, v in tables.flops_per_cycle.items() if k in dev.features), default=8.0)
    cores = sum(c.cores for c in profile.cpu.clusters)
    return per_cycle * dev.clock_hz * min(cores, dev.threads)


def gpu_bandwidth(profile: DeviceProfile) -> float:
    """Bandwidth GPU kernels read at: the GPU's own memory when discrete, else the shared memory."""
    dedicated = [a.bandwidth for a in profile.accelerators if a.kind == "gpu" and a.memory and a.bandwidth]
    return max(dedicated) if dedicated else profile.memory.bandwidth


@dataclass(frozen=True)
class Side:
    """The time one side (CPU or GPU) spends per token."""

    weights_s: float
    mem_s: float
    cpu_s: float
    kv_bandwidth: float                   # effective bytes/s for its KV reads
    layers: range


def _side(shape: ModelShape, tensors: tuple[TensorFact, ...], types: Recipe, dev: Device, eff: Efficiency,
          tables: SpeedTables, gpu_layers: int, gpu: bool) -> Side:
    reads = read_per_token(tensors, types, shape.tied_embeddings, gpu_layers, shape.n_layers, gpu)
    total, mem, cpu = _weight_seconds(reads, dev, eff, tables.cpu_cycles.get(dev.isa, {}))
    layers = range(min(gpu_layers, shape.n_layers)) if gpu else range(min(gpu_layers, shape.n_layers), shape.n_layers)
    return Side(total, mem, cpu, dev.bandwidth * eff.bandwidth, layers)


def estimate(shape: ModelShape, tensors: tuple[TensorFact, ...], types: Recipe, s: Settings,
             profile: DeviceProfile, backend: str, threads: int, tables: SpeedTables,
             gpu_layers: int = 0) -> SpeedEstimate:
    """Predict decode (short and full context) and prefill speed; ``gpu_layers`` run on a GPU ``backend``."""
    cpu_eff = tables.row("llama.cpp-cpu", profile.device_class)
    eff = tables.row(backend, profile.device_class)
    cpu_dev = device_facts(profile, threads)
    gpu = gpu_layers > 0 and not eff.cpu_bound
    sides = [_side(shape, tensors, types, cpu_dev, cpu_eff, tables, gpu_layers if gpu else 0, False)]
    if gpu:
        gpu_dev = replace(cpu_dev, bandwidth=gpu_bandwidth(profile))
        sides.append(_side(shape, tensors, types, gpu_dev, eff, tables, gpu_layers, True))
    fixed = cpu_eff.per_token_s + shape.vocab_size * cpu_eff.per_vocab_s
    fixed += eff.per_layer_s * min(gpu_layers, shape.n_layers) if gpu else 0.0
    t_weights = sum(side.weights_s for side in sides)

    def rate(depth: int) -> float:
        kv = sum(kv_read_bytes(shape, s, depth, side.layers) / side.kv_bandwidth for side in sides)
        return 1.0 / (t_weights + kv + fixed)

    flops = peak_flops(profile, cpu_dev, tables, gpu) * (eff if gpu else cpu_eff).prefill
    n_weights = sum(t.n_elements for t in tensors if t.name != "token_embd.weight" or shape.tied_embeddings)
    mem_s, cpu_s = sum(x.mem_s for x in sides), sum(x.cpu_s for x in sides)
    bound = "overhead" if fixed > t_weights else ("compute" if cpu_s > mem_s else "bandwidth")
    basis = (f"{eff.backend}/{eff.device_class}: {eff.bandwidth:.2f} of {sides[-1].kv_bandwidth / eff.bandwidth / 1e9:.1f} "
             f"GB/s, {cpu_dev.threads} threads at {cpu_dev.clock_hz / 1e9:.2f} GHz"
             f"{'' if cpu_dev.clock_known else ' (assumed)'}")
    return SpeedEstimate(decode_tokens_per_s=rate(1), decode_tokens_per_s_full=rate(s.n_ctx),
                         prefill_tokens_per_s=flops / (FLOP_PER_WEIGHT * n_weights) if n_weights else 0.0,
                         bytes_per_token=sum(sum(b for b, _ in read_per_token(tensors, types, shape.tied_embeddings,
                                                                              gpu_layers if gpu else 0,
                                                                              shape.n_layers, g).values())
                                             for g in (False, True)),
                         bound=bound, basis=basis)


# ------------------------------------------------------------------------------------ tables from data

def tables_from_dict(data: Mapping[str, Any]) -> SpeedTables:
    """Build SpeedTables from the parsed efficiency.toml. Raises KeyError/TypeError on a malformed table."""
    rows = tuple(Efficiency(**row) for row in data["efficiency"])
    return SpeedTables(efficiency=rows, cpu_cycles={k: dict(v) for k, v in data["cpu_cycles"].items()},
                       flops_per_cycle=dict(data["flops_per_cycle"]), source=str(data.get("source", "")))


def calibration_from_dict(data: Mapping[str, Any]) -> Calibration:
    """A Calibration from its TOML table (same row keys as efficiency.toml)."""
    return Calibration(device=str(data["device"]), efficiency=tuple(Efficiency(**r) for r in data.get("efficiency", ())),
                       cpu_cycles={k: dict(v) for k, v in data.get("cpu_cycles", {}).items()},
                       source=str(data.get("source", "")))
