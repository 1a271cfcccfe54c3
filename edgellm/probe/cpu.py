"""CPU: model, ISA features, physical and logical cores, clusters of cores by type and top clock.

Linux and Android read /proc/cpuinfo and /sys/devices/system/cpu; macOS reads sysctl.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgellm.errors import ProbeError
from edgellm.probe import known
from edgellm.probe.info import Cluster, CpuInfo
from edgellm.probe.system import Host

# Probe feature name -> token in the x86 /proc/cpuinfo "flags" line (the kernel spells SSE3 "pni").
X86_FLAGS: dict[str, str] = {
    "sse3": "pni", "ssse3": "ssse3", "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c",
    "bmi2": "bmi2", "avx_vnni": "avx_vnni", "avx512f": "avx512f", "avx512bw": "avx512bw",
    "avx512vl": "avx512vl", "avx512_vnni": "avx512_vnni", "avx512_bf16": "avx512_bf16",
    "amx_tile": "amx_tile", "amx_int8": "amx_int8", "amx_bf16": "amx_bf16",
}

# Probe feature name -> (token in the ARM /proc/cpuinfo "Features" line, macOS sysctl key or None)
ARM_FEATURES: dict[str, tuple[str, str | None]] = {
    "asimd": ("asimd", "hw.optional.AdvSIMD"),           # NEON
    "fp16": ("asimdhp", "hw.optional.arm.FEAT_FP16"),    # half-precision SIMD arithmetic
    "fhm": ("asimdfhm", "hw.optional.arm.FEAT_FHM"),
    "dotprod": ("asimddp", "hw.optional.arm.FEAT_DotProd"),
    "i8mm": ("i8mm", "hw.optional.arm.FEAT_I8MM"),
    "bf16": ("bf16", "hw.optional.arm.FEAT_BF16"),
    "sve": ("sve", None),                                  # Apple cores have no SVE
    "sve2": ("sve2", None),
    "sme": ("sme", "hw.optional.arm.FEAT_SME"),
}

# Intel Macs: probe feature -> token in machdep.cpu.features / machdep.cpu.leaf7_features
MAC_X86_FLAGS: dict[str, str] = {
    "sse3": "SSE3", "ssse3": "SSSE3", "avx": "AVX1.0", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C",
    "bmi2": "BMI2", "avx512f": "AVX512F", "avx512bw": "AVX512BW", "avx512vl": "AVX512VL",
    "avx512_vnni": "AVX512VNNI",
}

ARCH_ALIASES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}

# Intel hybrid parts list their P- and E-cores in these files (the kernel's perf PMU per core type).
HYBRID_CORE_TYPES = (("/sys/devices/cpu_core/cpus", "P-core"), ("/sys/devices/cpu_atom/cpus", "E-core"))

_SYS_CPU = "/sys/devices/system/cpu"


def parse_cpuinfo(text: str) -> list[dict[str, str]]:
    """/proc/cpuinfo -> one dict per blank-line separated block (processor blocks and any trailer)."""
    blocks, current = [], {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
            current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip()] = value.strip()
    if current:
        blocks.append(current)
    return blocks


def parse_cpu_list(text: str) -> list[int]:
    """Kernel CPU list "0-3,8,10-11" -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def features_from_tokens(tokens: set[str], table: dict[str, str]) -> tuple[str, ...]:
    """Probe feature names whose token is present, in table order."""
    return tuple(name for name, token in table.items() if token in tokens)


def _common_tokens(blocks: list[dict[str, str]], key: str) -> set[str]:
    # A feature counts only if every core has it: threads run on any core of a big.LITTLE system.
    sets = [set(b[key].split()) for b in blocks if key in b]
    return set.intersection(*sets) if sets else set()


@dataclass(frozen=True)
class _Core:
    """One logical CPU as Linux describes it."""
    cpu: int
    core_type: str
    core_key: str          # same value for SMT siblings of one physical core
    max_freq_hz: float | None


def _core_type(block: dict[str, str], hybrid: dict[int, str], model: str) -> str:
    cpu = int(block["processor"])
    if cpu in hybrid:
        return hybrid[cpu]
    if "CPU part" in block:
        key = (int(block.get("CPU implementer", "0"), 16), int(block["CPU part"], 16))
        return known.ARM_CORES.get(key, f"part {block['CPU part']}")
    return model


def _core_key(host: Host, block: dict[str, str]) -> str:
    # thread_siblings_list names the SMT siblings of one core. core_id alone is not unique: arm64 kernels
    # number cores within each cluster, so (package, core_id) pairs repeat across clusters.
    cpu = block["processor"]
    siblings = host.r.value(f"{_SYS_CPU}/cpu{cpu}/topology/thread_siblings_list")
    if siblings:
        return f"siblings {siblings}"
    if "core id" in block:
        return f"package {block.get('physical id', '0')} core {block['core id']}"
    return f"cpu {cpu}"   # no SMT information: ARM cores without SMT are one thread each


def _max_freq(host: Host, cpu: int) -> float | None:
    khz = host.r.value(f"{_SYS_CPU}/cpu{cpu}/cpufreq/cpuinfo_max_freq")
    return int(khz) * 1e3 if khz.isdigit() else None


def _hybrid_types(host: Host) -> dict[int, str]:
    types = {}
    for path, name in HYBRID_CORE_TYPES:
        types.update({cpu: name for cpu in parse_cpu_list(host.r.value(path))})
    return types


def group_clusters(cores: list[_Core]) -> tuple[Cluster, ...]:
    """Cores grouped by (type, top clock), fastest first: big.LITTLE and prime cores come apart."""
    groups: dict[tuple[str, float | None], list[_Core]] = {}
    for core in cores:
        groups.setdefault((core.core_type, core.max_freq_hz), []).append(core)
    clusters = [Cluster(t, tuple(c.cpu for c in cs), len({c.core_key for c in cs}), f)
                for (t, f), cs in groups.items()]
    return tuple(sorted(clusters, key=lambda c: (-(c.max_freq_hz or 0.0), c.cpus[0])))


def _arm_model(clusters: tuple[Cluster, ...]) -> str:
    counts: dict[str, int] = {}
    for c in clusters:
        counts[c.core] = counts.get(c.core, 0) + c.physical_cores
    return " + ".join(f"{n}x {core}" for core, n in counts.items())


def _arm_vendor(blocks: list[dict[str, str]]) -> str:
    codes = {int(b["CPU implementer"], 16) for b in blocks if "CPU implementer" in b}
    return ", ".join(sorted(known.ARM_IMPLEMENTERS.get(c, hex(c)) for c in codes))


def detect_linux(host: Host) -> CpuInfo:
    """CPU facts from /proc/cpuinfo and sysfs. Raises ProbeError when /proc/cpuinfo lists no processor."""
    blocks = [b for b in parse_cpuinfo(host.cpuinfo) if b.get("processor", "").isdigit()]
    if not blocks:
        raise ProbeError(what="/proc/cpuinfo", problem="no processor entries")
    arch = ARCH_ALIASES.get(host.machine.lower(), host.machine)
    model = blocks[0].get("model name", "")
    hybrid = _hybrid_types(host)
    cores = [_Core(int(b["processor"]), _core_type(b, hybrid, model or arch), _core_key(host, b),
                   _max_freq(host, int(b["processor"]))) for b in blocks]
    clusters = group_clusters(cores)
    if arch == "x86_64":
        features = features_from_tokens(_common_tokens(blocks, "flags"), X86_FLAGS)
        vendor = blocks[0].get("vendor_id", "")
    else:
        arm = {name: token for name, (token, _) in ARM_FEATURES.items()}
        features = features_from_tokens(_common_tokens(blocks, "Features"), arm)
        vendor = _arm_vendor(blocks)
        model = model if model and not model.startswith("ARMv") else _arm_model(clusters)
    physical = len({c.core_key for c in cores})
    return CpuInfo(arch, model, vendor, features, physical, len(cores), clusters)


def _sysctl_int(host: Host, key: str) -> int:
    value = host.sysctl.get(key, "")
    return int(value) if value.isdigit() else 0


def _mac_clusters(host: Host) -> tuple[Cluster, ...]:
    """Performance levels (P- then E-cores) as clusters; macOS does not publish core clocks."""
    levels = _sysctl_int(host, "hw.nperflevels")
    if not levels:   # Intel Macs: one kind of core
        logical = _sysctl_int(host, "hw.logicalcpu")
        model = host.sysctl.get("machdep.cpu.brand_string", "cores")
        return (Cluster(model, tuple(range(logical)), _sysctl_int(host, "hw.physicalcpu"), None),)
    clusters, first = [], 0
    for level in range(levels):
        prefix = f"hw.perflevel{level}"
        physical = _sysctl_int(host, f"{prefix}.physicalcpu")
        logical = _sysctl_int(host, f"{prefix}.logicalcpu") or physical
        name = host.sysctl.get(f"{prefix}.name", f"level {level}")
        clusters.append(Cluster(f"{name} cores", tuple(range(first, first + logical)), physical, None))
        first += logical
    return tuple(clusters)


def detect_darwin(host: Host) -> CpuInfo:
    """CPU facts from sysctl hw.* and machdep.cpu.*."""
    arch = ARCH_ALIASES.get(host.machine.lower(), host.machine)
    if arch == "aarch64":
        keys = {name: key for name, (_, key) in ARM_FEATURES.items() if key}
        features = tuple(name for name, key in keys.items() if host.sysctl.get(key) == "1")
        vendor = "Apple"
    else:
        tokens = set(host.sysctl.get("machdep.cpu.features", "").split())
        tokens |= set(host.sysctl.get("machdep.cpu.leaf7_features", "").split())
        features = features_from_tokens(tokens, MAC_X86_FLAGS)
        vendor = host.sysctl.get("machdep.cpu.vendor", "")
    return CpuInfo(arch, host.sysctl.get("machdep.cpu.brand_string", ""), vendor, features,
                   _sysctl_int(host, "hw.physicalcpu"), _sysctl_int(host, "hw.logicalcpu"), _mac_clusters(host))


def detect(host: Host) -> CpuInfo:
    """The CPU of ``host``. Raises ProbeError when the essential sources cannot be parsed."""
    return detect_darwin(host) if host.system == "darwin" else detect_linux(host)
