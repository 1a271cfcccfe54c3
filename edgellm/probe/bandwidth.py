"""Memory bandwidth: a datasheet figure for known devices, a stated assumption otherwise, or a measurement.

The measurement copies a large numpy array and counts read + write bytes (the convention of
measured-here.md, where this 2-core VM gave about 32 GB/s). It takes about 1.5 seconds.
"""

from __future__ import annotations

import time

from edgellm.probe import known
from edgellm.probe.info import BandwidthInfo, BoardInfo, CpuInfo

MIB = 2**20
MEASURE_BYTES = 128 * MIB        # past the last-level cache of edge and laptop CPUs, so the copy streams from DRAM
MIN_MEASURE_BYTES = 16 * MIB
MEASURE_BUDGET_S = 1.5           # whole measurement, allocation included (page faults are slow in VMs)
MIN_REPEATS, MAX_REPEATS = 3, 20

# arch -> (bytes/s, basis) assumed when the device is not in a table: DRAM type is unreadable without root
GENERIC: dict[str, tuple[float, str]] = {
    "x86_64": (51.2 * known.GB_S, "assumed dual-channel DDR4-3200 (2 x 8 B x 3200 MT/s = 51.2 GB/s); "
                                  "the memory type is not known"),
    "aarch64": (17.1 * known.GB_S, "assumed a 32-bit LPDDR4X-4267 bus (4 B x 4267 MT/s = 17.1 GB/s); "
                                   "the memory type is not known"),
}
FALLBACK = (17.1 * known.GB_S, "assumed 17.1 GB/s (32-bit LPDDR4X); the memory type is not known")


def known_memory(system: str, board: BoardInfo) -> known.Memory | None:
    """The datasheet memory of a recognised device: Jetson module, Apple chip, phone SoC or SBC."""
    if board.jetson and board.jetson.module in known.JETSON_MODULES:
        return known.JETSON_MODULES[board.jetson.module].memory
    if system == "darwin":
        return known.APPLE_CHIPS.get(board.soc)
    if system == "android":
        soc = known.ANDROID_SOCS.get(board.soc)
        return soc.memory if soc else None
    return next((m for prefix, m in known.SBC_MODELS.items() if board.model.startswith(prefix)), None)


def estimate(system: str, board: BoardInfo, cpu: CpuInfo) -> BandwidthInfo:
    """Peak DRAM bandwidth from the tables, or the generic assumption for the CPU architecture."""
    memory = known_memory(system, board)
    if memory:
        return BandwidthInfo(memory.bandwidth, False, f"{memory.kind} theoretical peak, {memory.source}")
    value, basis = GENERIC.get(cpu.arch, FALLBACK)
    return BandwidthInfo(value, False, basis)


def measure(available: int) -> BandwidthInfo:
    """Copy bandwidth of this machine (best of several numpy copies), in bytes/s."""
    import numpy as np

    deadline = time.perf_counter() + MEASURE_BUDGET_S
    nbytes = max(MIN_MEASURE_BYTES, min(MEASURE_BYTES, available // 8))
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)            # first touch: page faults are not bandwidth
    best, repeats = float("inf"), 0
    while repeats < MIN_REPEATS or (repeats < MAX_REPEATS and time.perf_counter() < deadline):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
        repeats += 1
    rate = 2 * src.nbytes / best   # each copy reads and writes nbytes
    return BandwidthInfo(rate, True, f"numpy copy of {src.nbytes // MIB} MiB, best of {repeats}, "
                                     "counting bytes read + written")
