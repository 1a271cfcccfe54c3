"""The hardware probe on recorded trees of real devices, on this machine, and through the CLI."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import pytest

from edgellm import cli
from edgellm.backends import BACKENDS
from edgellm.errors import ProbeError, UsageError
from edgellm.probe import FixtureRoot, LiveRoot, MachineInfo, build_profile, local_profile, probe
from edgellm.probe import choose, cpu, memory, runtimes, system
from edgellm.targets import parse_profile, uncovered_figures
from edgellm.targets.schema import CPU_FEATURES

FIXTURES = Path(__file__).parent / "fixtures" / "probe"
DEVICES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
GHZ = 1e9
KIB = 1024


@functools.cache
def probed(name: str) -> MachineInfo:
    return probe(FixtureRoot(FIXTURES / name))


def copy_tree(name: str, tmp_path: Path) -> Path:
    """A writable copy of a fixture tree, for tests that break or change it."""
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def edit_answers(tree: Path, **changes: Any) -> None:
    answers = json.loads((tree / "answers.json").read_text())
    answers.update(changes)
    (tree / "answers.json").write_text(json.dumps(answers))


# name -> what the device is publicly known to have: (system, arch, physical cores, logical cores,
# clusters as (core, cores, max GHz or None), device class, GGUF backend, ONNX backend)
EXPECTED: dict[str, tuple] = {
    "ryzen-5800u-laptop": ("linux", "x86_64", 8, 16,
                           [("AMD Ryzen 7 5800U with Radeon Graphics", 8, 4.4)], "laptop",
                           "llama.cpp-cpu", "onnxruntime-cpu"),
    "xeon-l4-server": ("linux", "x86_64", 4, 8, [("Intel(R) Xeon(R) CPU @ 2.20GHz", 4, None)], "server",
                       "llama.cpp-cuda", "onnxruntime-cuda"),
    "intel-core-ultra-laptop": ("linux", "x86_64", 16, 22, [("P-core", 6, 4.8), ("E-core", 8, 3.8), ("E-core", 2, 2.5)],
                                "laptop", "llama.cpp-vulkan", "onnxruntime-cpu"),
    "jetson-orin-nano": ("linux", "aarch64", 6, 6, [("Cortex-A78AE", 6, 1.728)], "embedded",
                         "llama.cpp-cuda", "onnxruntime-cpu"),
    "raspberry-pi-5": ("linux", "aarch64", 4, 4, [("Cortex-A76", 4, 2.4)], "sbc", "llama.cpp-cpu", "onnxruntime-cpu"),
    "apple-m2": ("darwin", "aarch64", 8, 8, [("Performance cores", 4, None), ("Efficiency cores", 4, None)],
                 "laptop", "llama.cpp-metal", "onnxruntime-cpu"),
    "android-snapdragon-8gen3": ("android", "aarch64", 8, 8,
                                 [("Cortex-X4", 1, 3.3024), ("Cortex-A720", 3, 3.1488), ("Cortex-A720", 2, 2.9568),
                                  ("Cortex-A520", 2, 2.2656)], "phone", "llama.cpp-cpu", "onnxruntime-cpu"),
}

# name -> (features that must be reported, features that must not)
FEATURES: dict[str, tuple[set[str], set[str]]] = {
    "ryzen-5800u-laptop": ({"sse3", "ssse3", "avx", "avx2", "fma", "f16c"}, {"avx512f", "avx_vnni", "amx_int8"}),
    "xeon-l4-server": ({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}, {"avx512_bf16", "amx_int8"}),
    "intel-core-ultra-laptop": ({"avx2", "fma", "f16c", "avx_vnni"}, {"avx512f", "amx_tile"}),
    "jetson-orin-nano": ({"asimd", "fp16", "dotprod"}, {"i8mm", "sve", "bf16"}),
    "raspberry-pi-5": ({"asimd", "fp16", "dotprod"}, {"i8mm", "sve", "sve2", "bf16"}),
    "apple-m2": ({"asimd", "fp16", "fhm", "dotprod", "i8mm", "bf16"}, {"sve", "sme"}),
    "android-snapdragon-8gen3": ({"asimd", "dotprod", "i8mm", "bf16", "fhm"}, {"sve", "sme"}),
}

# name -> (MemTotal, MemAvailable) in bytes, as recorded
MEMORY: dict[str, tuple[int, int]] = {
    "ryzen-5800u-laptop": (15708392 * KIB, 11234560 * KIB),
    "xeon-l4-server": (32873136 * KIB, 31542808 * KIB),
    "intel-core-ultra-laptop": (32119200 * KIB, 26311020 * KIB),
    "jetson-orin-nano": (7650336 * KIB, 5883404 * KIB),
    "raspberry-pi-5": (8254000 * KIB, 7512344 * KIB),
    "apple-m2": (16 * 2**30, (31234 + 240111) * 16384),   # vm_stat free + inactive pages of 16 KiB
    "android-snapdragon-8gen3": (15395120 * KIB, 7912044 * KIB),
}

# name -> (GPU names, NPU names)
ACCELERATORS: dict[str, tuple[list[str], list[str]]] = {
    "ryzen-5800u-laptop": (["AMD Radeon Graphics (RADV RENOIR)"], []),
    "xeon-l4-server": (["NVIDIA L4"], []),
    "intel-core-ultra-laptop": (["Intel(R) Arc(tm) Graphics (MTL)"], ["Intel NPU"]),
    "jetson-orin-nano": (["Orin (nvgpu)"], []),
    "raspberry-pi-5": ([], []),
    "apple-m2": (["Apple M2 GPU"], ["Apple Neural Engine"]),
    "android-snapdragon-8gen3": (["Adreno 750"], ["Qualcomm Hexagon NPU"]),
}


def test_every_fixture_tree_has_expectations():
    assert set(DEVICES) == set(EXPECTED) == set(FEATURES) == set(MEMORY) == set(ACCELERATORS)


@pytest.mark.parametrize("name", DEVICES)
def test_cores_clusters_and_choice(name):
    system_name, arch, physical, logical, clusters, device_class, gguf, onnx = EXPECTED[name]
    info = probed(name)
    assert (info.os.system, info.cpu.arch) == (system_name, arch)
    assert (info.cpu.physical_cores, info.cpu.logical_cores) == (physical, logical)
    found = [(c.core, c.physical_cores, c.max_freq_hz and round(c.max_freq_hz / GHZ, 4)) for c in info.cpu.clusters]
    assert found == clusters
    assert info.device_class == device_class and info.device_class_reason
    assert (info.gguf.backend, info.onnx.backend) == (gguf, onnx)


@pytest.mark.parametrize("name", DEVICES)
def test_features_are_detected_on_every_core(name):
    present, absent = FEATURES[name]
    info = probed(name)
    assert present <= set(info.cpu.features)
    assert not absent & set(info.cpu.features)
    assert set(info.cpu.features) <= set(CPU_FEATURES[info.cpu.arch])   # the profiles' vocabulary


@pytest.mark.parametrize("name", DEVICES)
def test_memory(name):
    info = probed(name)
    assert (info.memory.total, info.memory.available) == MEMORY[name]


@pytest.mark.parametrize("name", DEVICES)
def test_gpus_and_npus(name):
    info = probed(name)
    gpus, npus = ACCELERATORS[name]
    assert [g.name for g in info.gpus] == gpus
    assert [n.name for n in info.npus] == npus


@pytest.mark.parametrize("name", DEVICES)
def test_every_candidate_has_a_verdict_and_reason(name):
    info = probed(name)
    for choice, rows in ((info.gguf, choose.GGUF_ROWS), (info.onnx, choose.ONNX_ROWS)):
        assert [c.backend for c in choice.considered] == [r.backend for r in rows]
        assert all(c.reason for c in choice.considered)
        assert choice.usable[0] == choice.backend
        assert all(BACKENDS[b].format == choice.format for b in choice.usable)
    json.dumps(info.to_dict())   # plain JSON, no custom encoder needed


@pytest.mark.parametrize("name", DEVICES)
def test_profile_round_trips_through_the_strict_loader(name):
    info = probed(name)
    profile = build_profile(info)
    assert profile == parse_profile(as_toml_table(profile), f"local from {name}")
    assert uncovered_figures(profile) == []
    assert profile.id == "local"
    assert profile.memory.usable == info.memory.available
    assert profile.backends[0] == info.gguf.backend
    bandwidth_titles = [s.title for s in profile.sources if "memory.bandwidth" in s.figures]
    assert len(bandwidth_titles) == 1 and bandwidth_titles[0].startswith("estimated")


_UNIT_SUFFIX = {"bytes": "B", "bandwidth": "B/s", "frequency": "Hz", "ops": "OPS", "power": "W"}


def as_toml_table(obj: Any) -> Any:
    """A profile dataclass as the TOML table a profile file would hold (units written out)."""
    if isinstance(obj, tuple):
        return [as_toml_table(v) for v in obj]
    if not dataclasses.is_dataclass(obj):
        return obj
    table = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        unit = f.metadata.get("unit")
        table[f.name] = f"{value} {_UNIT_SUFFIX[unit]}" if unit else as_toml_table(value)
    return table


# --- per-device details -----------------------------------------------------------------------------

def test_laptop_with_cpu_only_llama_cpp_says_why_the_igpu_is_unused():
    info = probed("ryzen-5800u-laptop")
    assert info.gguf.reason == ("llama.cpp in this environment was built without GPU offload "
                                "(AMD Radeon Graphics (RADV RENOIR) unused); CPU has AVX2+FMA")
    vulkan = next(c for c in info.gguf.considered if c.backend == "llama.cpp-vulkan")
    assert vulkan.hardware and not vulkan.usable and "-DGGML_VULKAN=on" in vulkan.hint
    gpu = info.gpus[0]
    assert gpu.apis == ("vulkan",) and gpu.integrated and gpu.unified_memory and gpu.vendor == "amd"
    assert info.board.battery and info.board.chassis == "Notebook"
    assert info.commands == {"getprop": False, "nvidia-smi": False, "vulkaninfo": True}


def test_server_with_discrete_gpu_uses_cuda_for_both_formats():
    info = probed("xeon-l4-server")
    gpu = info.gpus[0]
    assert (gpu.memory_total, gpu.memory_free) == (23034 * 2**20, 22563 * 2**20)
    assert (gpu.compute_capability, gpu.driver, gpu.unified_memory) == ("8.9", "550.90.07", False)
    assert "NVIDIA L4" in info.gguf.reason and "ARCHS = 890" in info.gguf.reason
    assert info.onnx.usable == ("onnxruntime-cuda", "onnxruntime-tensorrt", "onnxruntime-cpu")
    openvino = next(c for c in info.onnx.considered if c.backend == "onnxruntime-openvino")
    assert openvino.hardware and not openvino.usable and "onnxruntime-openvino" in openvino.hint
    assert info.board.virtual and info.device_class_reason.startswith("virtual machine")
    profile = build_profile(info)
    assert profile.accelerators[0].memory == 23034 * 2**20 and not profile.memory.unified


def test_jetson_gpu_is_unified_and_its_missing_nvidia_smi_memory_is_expected():
    info = probed("jetson-orin-nano")
    jetson = info.board.jetson
    assert (jetson.l4t, jetson.jetpack, jetson.module, jetson.soc) == ("R36.4.3", "6.x", "p3767-0005", "tegra234")
    assert info.board.model == "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"
    gpu = info.gpus[0]
    assert (gpu.memory_total, gpu.unified_memory, gpu.integrated) == (None, True, True)
    assert gpu.compute_capability == "8.7"   # nvidia-smi said [N/A]; tegra234 is always sm_87
    assert any("[N/A]" in n for n in info.notes)
    assert "ARCHS = 870" in info.gguf.reason and "warning" not in info.gguf.reason
    assert "fell back from onnxruntime-cuda" in info.onnx.reason and "Jetson Zoo" in info.onnx.reason
    assert info.bandwidth.bytes_per_s == 68 * GHZ and "DS-11105-001" in info.bandwidth.basis
    profile = build_profile(info)
    assert profile.memory.unified and profile.memory.kind == "LPDDR5"
    assert profile.backends == ("llama.cpp-cuda", "llama.cpp-cpu", "onnxruntime-cpu")
    gpu_acc = profile.accelerators[0]
    assert (gpu_acc.api, gpu_acc.compute_capability, gpu_acc.memory) == ("cuda", "8.7", None)


def test_raspberry_pi_is_an_sbc_with_dotprod_and_no_gpu():
    info = probed("raspberry-pi-5")
    assert info.cpu.model == "4x Cortex-A76" and info.cpu.vendor == "ARM"
    assert info.gguf.reason == "no GPU that llama.cpp can use was found; CPU has NEON+dotprod"
    assert info.bandwidth.bytes_per_s == pytest.approx(17.1 * GHZ)
    assert (info.memory.swap_total, info.memory.swap_free) == (204796 * KIB, 204796 * KIB)


def test_apple_m2_uses_metal_and_ranks_coreml_after_the_cpu():
    info = probed("apple-m2")
    assert info.os.name == "macOS 14.5" and info.board.model == "Mac14,2" and info.board.battery
    assert (info.memory.swap_total, info.memory.swap_free) == (1024 * 2**20, int(711.75 * 2**20))
    assert "METAL" in info.gguf.reason
    assert info.onnx.usable == ("onnxruntime-cpu", "onnxruntime-coreml")
    assert "onnxruntime-coreml is also available but ranks lower" in info.onnx.reason
    coreml = next(c for c in info.onnx.considered if c.backend == "onnxruntime-coreml")
    assert "contrib ops" in coreml.reason
    assert info.bandwidth.bytes_per_s == 100 * GHZ
    assert all(c.max_freq_hz is None for c in info.cpu.clusters)
    profile = build_profile(info)
    assert [c.max_clock for c in profile.cpu.clusters] == [0.0, 0.0]
    assert any(s.figures == ("cpu.clusters.max_clock",) and "unknown" in s.title for s in profile.sources)


def test_android_phone_clusters_npu_and_missing_onnxruntime():
    info = probed("android-snapdragon-8gen3")
    assert info.cpu.model == "1x Cortex-X4 + 5x Cortex-A720 + 2x Cortex-A520"
    assert info.os.name == "Android 14 (SDK 34)" and info.board.soc == "SM8650"
    assert info.npus[0].api == "qnn" and "HTP v75" in info.npus[0].detail
    assert info.gpus[0].apis == ("vulkan", "opencl")
    assert not info.onnxruntime.installed and not info.onnx.ready
    assert "onnxruntime is not installed" in info.onnx.reason
    qnn = next(c for c in info.onnx.considered if c.backend == "onnxruntime-qnn")
    assert qnn.hardware and not qnn.usable
    assert "CPU has NEON+dotprod+i8mm" in info.gguf.reason
    assert info.bandwidth.bytes_per_s == pytest.approx(76.8 * GHZ)


def test_intel_hybrid_laptop_npu_and_vulkan_build():
    info = probed("intel-core-ultra-laptop")
    npu = info.npus[0]
    assert (npu.vendor, npu.api) == ("intel", "openvino")
    assert "Meteor Lake" in npu.detail and "/dev/accel/accel0" in npu.detail
    assert "Vulkan builds do not list themselves" in info.gguf.reason
    assert "onnxruntime-openvino is also available but ranks lower" in info.onnx.reason
    assert info.onnx.usable == ("onnxruntime-cpu", "onnxruntime-openvino")


# --- absent runtimes, broken trees, unsupported systems ---------------------------------------------

def test_missing_runtimes_name_what_would_be_used_and_how_to_install(tmp_path):
    tree = copy_tree("jetson-orin-nano", tmp_path)
    edit_answers(tree, llama_cpp=None, onnxruntime=None)
    info = probe(FixtureRoot(tree))
    assert not info.llama_cpp.installed and not info.gguf.ready
    assert info.gguf.backend == "llama.cpp-cuda"
    assert "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=87" in info.gguf.reason
    assert (info.onnx.backend, info.onnx.ready) == ("onnxruntime-cuda", False)
    assert "Jetson Zoo" in info.onnx.reason


def test_cuda_build_without_the_gpu_arch_is_flagged(tmp_path):
    tree = copy_tree("xeon-l4-server", tmp_path)
    answers = json.loads((tree / "answers.json").read_text())
    edit_answers(tree, llama_cpp=dict(answers["llama_cpp"],
                                      system_info=answers["llama_cpp"]["system_info"].replace("890", "700,750")))
    info = probe(FixtureRoot(tree))
    assert info.gguf.backend == "llama.cpp-cuda"
    assert "this GPU is sm_89" in info.gguf.reason and "-DCMAKE_CUDA_ARCHITECTURES=89" in info.gguf.reason


def test_missing_cpuinfo_is_a_probe_error(tmp_path):
    tree = copy_tree("raspberry-pi-5", tmp_path)
    (tree / "proc" / "cpuinfo").unlink()
    with pytest.raises(ProbeError, match="/proc/cpuinfo"):
        probe(FixtureRoot(tree))


def test_missing_meminfo_is_a_probe_error(tmp_path):
    tree = copy_tree("raspberry-pi-5", tmp_path)
    (tree / "proc" / "meminfo").unlink()
    with pytest.raises(ProbeError, match="/proc/meminfo"):
        probe(FixtureRoot(tree))


def test_mac_without_vm_stat_is_a_probe_error(tmp_path):
    tree = copy_tree("apple-m2", tmp_path)
    (tree / "commands" / "vm_stat.txt").unlink()
    with pytest.raises(ProbeError, match="vm_stat"):
        probe(FixtureRoot(tree))


def test_unsupported_system_is_a_probe_error(tmp_path):
    tree = copy_tree("raspberry-pi-5", tmp_path)
    edit_answers(tree, uname={"system": "Windows", "release": "10", "machine": "AMD64"})
    with pytest.raises(ProbeError, match="Windows"):
        probe(FixtureRoot(tree))


INTEL_MAC_SYSCTL = """hw.memsize: 17179869184
hw.physicalcpu: 4
hw.logicalcpu: 8
hw.model: MacBookPro15,2
machdep.cpu.brand_string: Intel(R) Core(TM) i7-8559U CPU @ 2.70GHz
machdep.cpu.vendor: GenuineIntel
machdep.cpu.features: FPU VME SSE SSE2 SSE3 PCLMULQDQ SSSE3 FMA CX16 SSE4.1 SSE4.2 POPCNT AES XSAVE AVX1.0 F16C
machdep.cpu.leaf7_features: RDWRFSGS BMI1 AVX2 SMEP BMI2 ERMS INVPCID
kern.osproductversion: 13.6.7
vm.swapusage: total = 0.00M  used = 0.00M  free = 0.00M  (encrypted)
"""


def test_intel_mac_from_sysctl(tmp_path):
    tree = copy_tree("apple-m2", tmp_path)
    (tree / "commands" / "sysctl.txt").write_text(INTEL_MAC_SYSCTL)
    (tree / "commands" / "pmset.txt").unlink()
    edit_answers(tree, uname={"system": "Darwin", "release": "22.6.0", "machine": "x86_64"})
    info = probe(FixtureRoot(tree))
    assert info.cpu.features == ("sse3", "ssse3", "avx", "avx2", "fma", "f16c", "bmi2")
    assert (info.cpu.physical_cores, info.cpu.logical_cores, len(info.cpu.clusters)) == (4, 8, 1)
    assert (info.gpus, info.npus) == ((), ())
    assert (info.device_class, info.device_class_reason) == ("laptop", "Mac model MacBookPro15,2")
    assert info.gguf.backend == "llama.cpp-cpu"


def test_fixture_without_answers_is_a_probe_error(tmp_path):
    with pytest.raises(ProbeError, match="answers.json"):
        FixtureRoot(tmp_path)


def test_measuring_a_recorded_device_is_refused():
    with pytest.raises(UsageError):
        probe(FixtureRoot(FIXTURES / "raspberry-pi-5"), measure=True)


# --- parsers ------------------------------------------------------------------------------------------

def test_system_info_parses_current_and_old_formats():
    text = "CUDA : ARCHS = 500,610,870 | USE_GRAPHS = 1 | CPU : NEON = 1 | DOTPROD = 1 | "
    current = runtimes.parse_system_info(text)
    assert current == {"CUDA": {"ARCHS": "500,610,870", "USE_GRAPHS": "1"}, "CPU": {"NEON": "1", "DOTPROD": "1"}}
    old = runtimes.parse_system_info("AVX = 1 | AVX_VNNI = 0 | AVX2 = 1 | NEON = 0 | ")
    assert runtimes.enabled(old["CPU"]) == {"AVX", "AVX2"}


def test_amx_and_sse3_use_kernel_flag_names():
    flags = {"pni", "avx2", "amx_tile", "amx_int8", "amx_bf16", "avx512f", "avx512_bf16"}
    found = cpu.features_from_tokens(flags, cpu.X86_FLAGS)
    assert found == ("sse3", "avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def test_a_feature_missing_on_one_core_is_not_reported():
    text = "processor : 0\nFeatures : asimd asimddp i8mm\n\nprocessor : 1\nFeatures : asimd asimddp\n"
    blocks = cpu.parse_cpuinfo(text)
    assert cpu._common_tokens(blocks, "Features") == {"asimd", "asimddp"}


def test_build_and_cpu_feature_mismatches_are_reported():
    info = probed("xeon-l4-server")
    facts = choose.Facts("linux", info.cpu, (), (), dataclasses.replace(
        info.llama_cpp, registries={"CPU": {"AVX2": "1", "FMA": "1", "AMX_INT8": "1"}}), info.onnxruntime)
    notes = choose.build_vs_cpu(facts)
    assert any("does not use" in n and "AVX512_VNNI" in n for n in notes)
    assert any("AMX_INT8" in n and "illegal instruction" in n for n in notes)


@pytest.mark.parametrize("text, expected", [("0-3", [0, 1, 2, 3]), ("0,2,4-5", [0, 2, 4, 5]), ("", [])])
def test_cpu_list(text, expected):
    assert cpu.parse_cpu_list(text) == expected


def test_small_parsers():
    assert system.parse_getprop("[ro.soc.model]: [SM8650]\n[x]: []\ngarbage") == {"ro.soc.model": "SM8650", "x": ""}
    assert memory.parse_swapusage("total = 2048.00M  used = 0.00M  free = 2048.00M  (encrypted)") == (2**31, 2**31)
    assert memory.parse_meminfo("MemTotal: 1000 kB\nHugePages_Total: 0\n") == {"MemTotal": 1024000,
                                                                                "HugePages_Total": 0}


# --- this machine ---------------------------------------------------------------------------------------

def _this_machines_x86_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text()
    return set(next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split())


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc")
def test_live_probe_of_this_machine():
    info = probe()
    assert info.cpu.logical_cores == os.cpu_count()
    assert 1 <= info.cpu.physical_cores <= info.cpu.logical_cores
    assert 0 < info.memory.available <= info.memory.total
    if info.cpu.arch == "x86_64":
        assert ("avx2" in info.cpu.features) == ("avx2" in _this_machines_x86_flags())
    assert info.gguf.backend in BACKENDS and info.gguf.reason
    assert info.onnx.backend in BACKENDS and info.onnx.reason
    assert info.bandwidth.basis and not info.bandwidth.measured


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc")
def test_local_profile_measures_bandwidth_when_asked():
    profile = local_profile(measure=True)
    assert profile.id == "local" and profile.memory.bandwidth > 1 * GHZ
    title = next(s.title for s in profile.sources if "memory.bandwidth" in s.figures)
    assert title.startswith("measured on this machine")
    assert profile == parse_profile(as_toml_table(profile), "local")


def test_live_root_reports_absent_things_as_none(tmp_path):
    root = LiveRoot()
    assert root.read_text(str(tmp_path / "nope")) is None
    assert root.list_dir(str(tmp_path / "nope")) is None
    assert root.run("edgellm-no-such-command", []) is None


# --- CLI ---------------------------------------------------------------------------------------------------

def test_cli_text_report_on_a_fixture(capsys):
    assert cli.main(["probe", "--root", str(FIXTURES / "jetson-orin-nano")]) == 0
    out = capsys.readouterr().out
    assert "GGUF ->     llama.cpp-cuda" in out and "ONNX ->     onnxruntime-cpu" in out
    assert "Orin (nvgpu)" in out and "6x Cortex-A78AE (1.73 GHz)" in out
    assert len(out.splitlines()) < 25


def test_cli_json_on_a_fixture(capsys):
    assert cli.main(["probe", "--json", "--root", str(FIXTURES / "apple-m2")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gguf"]["backend"] == "llama.cpp-metal"
    assert data["onnx"]["usable"] == ["onnxruntime-cpu", "onnxruntime-coreml"]
    assert data["cpu"]["features"] == ["asimd", "fp16", "fhm", "dotprod", "i8mm", "bf16"]


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc")
def test_cli_json_on_this_machine(capsys):
    assert cli.main(["probe", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cpu"]["logical_cores"] == os.cpu_count()
    assert data["gguf"]["reason"] and data["onnx"]["reason"]


def test_cli_refuses_measure_with_root(capsys):
    code = cli.main(["probe", "--measure", "--root", str(FIXTURES / "raspberry-pi-5")])
    assert code == UsageError("").exit_code
    assert "--measure" in capsys.readouterr().err
