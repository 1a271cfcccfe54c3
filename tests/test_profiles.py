"""Device profiles: the built-in data, the strict loader, alias resolution and the `edgellm devices` command."""

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from edgellm import cli
from edgellm.backends import BACKENDS
from edgellm.errors import ProfileError, UnknownDeviceError
from edgellm.targets import (
    DeviceProfile, aliases, builtin_profiles, load_profile, parse_profile, resolve_device, uncovered_figures,
)
from edgellm.targets.schema import CPU_FEATURES

REQUIRED_IDS = {
    "jetson-orin-nano-4gb", "jetson-orin-nano-8gb", "jetson-orin-nano-super-8gb", "jetson-orin-nx-8gb",
    "jetson-orin-nx-16gb", "jetson-agx-orin-32gb", "jetson-agx-orin-64gb", "raspberry-pi-5-4gb",
    "raspberry-pi-5-8gb", "snapdragon-8-gen-3-12gb", "snapdragon-8-elite-16gb", "iphone-15-pro", "apple-m1-8gb",
    "apple-m2-16gb", "apple-m3-pro-18gb", "laptop-x86-8gb", "laptop-x86-16gb", "laptop-x86-32gb",
    "intel-core-ultra-npu-16gb",
}
# family alias -> the member it must resolve to (the one with the least usable memory)
FAMILIES = {
    "jetson-orin": "jetson-orin-nano-4gb",
    "jetson-orin-nano": "jetson-orin-nano-4gb",
    "jetson-orin-nx": "jetson-orin-nx-8gb",
    "jetson-agx-orin": "jetson-agx-orin-32gb",
    "raspberry-pi-5": "raspberry-pi-5-4gb",
    "snapdragon": "snapdragon-8-gen-3-12gb",
    "apple-m": "apple-m1-8gb",
    "laptop-x86": "laptop-x86-8gb",
    "iphone": "iphone-15-pro",
}

# A small valid profile, written the way a user would write their own board.
CUSTOM = """\
id = "my-board"
name = "My board"
device_class = "sbc"
backends = ["llama.cpp-cpu"]

[cpu]
arch = "aarch64"
features = ["asimd", "dotprod"]

[[cpu.clusters]]
core = "Cortex-A55"
cores = 4
max_clock = "1.8 GHz"

[memory]
total = "4 GiB"
usable = "3 GiB"
bandwidth = "12.8 GB/s"

[[sources]]
figures = ["memory.total", "memory.bandwidth"]
title = "my board's datasheet"
"""


def write(tmp_path: Path, text: str, name: str = "board.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


PROFILES = builtin_profiles()


# --- the built-in data ---------------------------------------------------------------------------------------

def test_every_required_profile_is_built_in():
    assert REQUIRED_IDS <= set(PROFILES)


@pytest.mark.parametrize("profile_id", sorted(PROFILES))
def test_builtin_profile_is_complete_and_sourced(profile_id):
    p = PROFILES[profile_id]
    assert p.cpu.cores > 0 and all(c.max_clock > 0 for c in p.cpu.clusters)
    assert 0 < p.memory.usable <= p.memory.total
    assert p.memory.bandwidth > 0
    assert uncovered_figures(p) == [], "every figure needs a source"
    assert set(p.cpu.features) <= set(CPU_FEATURES[p.cpu.arch]), "features use the probe's spelling"
    assert all(b in BACKENDS for b in p.backends)
    assert len(p.backends) == len(set(p.backends))
    assert p.notes, "the usable-memory reserve must be explained"
    assert sum(m.default for m in p.power_modes) == (1 if p.power_modes else 0)


def test_sources_name_memory_total_and_bandwidth_explicitly():
    for p in PROFILES.values():
        named = {f for s in p.sources for f in s.figures}
        assert {"memory.total", "memory.bandwidth"} <= named, p.id


def test_jetson_facts():
    for p in PROFILES.values():
        if p.id.startswith("jetson-orin"):
            assert p.backends[0] == "llama.cpp-cuda"
            assert p.memory.unified
            assert [a.compute_capability for a in p.accelerators if a.api == "cuda"] == ["8.7"]
            assert "jetson-orin" in p.aliases
    super_modes = {m.name: m for m in PROFILES["jetson-orin-nano-super-8gb"].power_modes}
    assert {"MAXN_SUPER", "25W"} <= set(super_modes) and super_modes["25W"].default
    # Super mode raises the memory clock: 68 -> 102 GB/s on the same 8 GB module.
    assert PROFILES["jetson-orin-nano-8gb"].memory.bandwidth == pytest.approx(68e9)
    assert PROFILES["jetson-orin-nano-super-8gb"].memory.bandwidth == pytest.approx(102e9)


def test_backend_preferences_that_the_design_relies_on():
    assert PROFILES["intel-core-ultra-npu-16gb"].backends[0] == "onnxruntime-openvino"
    assert PROFILES["snapdragon-8-gen-3-12gb"].backends[0] == "llama.cpp-cpu"
    assert "onnxruntime-qnn" in PROFILES["snapdragon-8-elite-16gb"].backends
    assert PROFILES["apple-m1-8gb"].backends[0] == "llama.cpp-metal"
    npu = [a for a in PROFILES["intel-core-ultra-npu-16gb"].accelerators if a.kind == "npu"]
    assert npu and npu[0].api == "openvino"


def test_aliases_never_shadow_an_id():
    assert not set(aliases()) & set(PROFILES)


# --- alias resolution ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("alias, expected", sorted(FAMILIES.items()))
def test_family_alias_resolves_to_smallest_member(alias, expected):
    resolved = resolve_device(alias)
    assert resolved.profile.id == expected
    members = [p for p in PROFILES.values() if alias in p.aliases]
    assert len(members) >= 1
    assert resolved.profile.memory.usable == min(p.memory.usable for p in members)
    assert expected in resolved.reason and alias in resolved.reason


def test_id_resolves_to_itself():
    assert resolve_device("apple-m2-16gb").profile is PROFILES["apple-m2-16gb"]


def test_unknown_device_names_the_value_and_lists_known_names():
    with pytest.raises(UnknownDeviceError) as info:
        resolve_device("jetson-nanoo")
    assert "jetson-nanoo" in str(info.value)
    assert "jetson-orin-nano-8gb" in info.value.hint and "jetson-orin" in info.value.hint


# --- custom files and validation -----------------------------------------------------------------------------

def test_custom_profile_file_loads_and_resolves(tmp_path):
    path = write(tmp_path, CUSTOM)
    profile = load_profile(path)
    assert isinstance(profile, DeviceProfile)
    assert profile.memory.total == 4 * 2**30
    assert profile.memory.bandwidth == pytest.approx(12.8e9)
    assert profile.cpu.clusters[0].max_clock == pytest.approx(1.8e9)
    resolved = resolve_device(str(path))
    assert resolved.profile == profile and str(path) in resolved.reason


@pytest.mark.parametrize("old, new, words", [
    ('name = "My board"', 'name = "My board"\ncolour = "red"', ["top level", "unknown key", "colour"]),
    ('[memory]', '[memory]\nspeed = "fast"', ["memory", "unknown key", "speed"]),
    ('total = "4 GiB"', "total = 8", ["memory.total", "8", "no unit"]),
    ('bandwidth = "12.8 GB/s"', 'bandwidth = "12.8 GB"', ["memory.bandwidth", "B/s"]),
    ('max_clock = "1.8 GHz"', 'max_clock = "1.8 GB/s"', ["cpu.clusters[0].max_clock", "Hz"]),
    ('["llama.cpp-cpu"]', '["llama.cpp-tpu"]', ["backends", "llama.cpp-tpu"]),
    ('name = "My board"\n', "", ["name", "missing"]),
    ('usable = "3 GiB"', 'usable = "5 GiB"', ["memory.usable", "memory.total"]),
    ('device_class = "sbc"', 'device_class = "toaster"', ["device_class", "toaster"]),
    ('arch = "aarch64"', 'arch = "riscv64"', ["cpu.arch", "riscv64"]),
    ('cores = 4', 'cores = "four"', ["cpu.clusters[0].cores", "four"]),
    ('"memory.bandwidth"]', '"memory.bandwith"]', ["sources[0].figures", "memory.bandwith"]),
])
def test_validation_errors_name_the_problem(tmp_path, old, new, words):
    assert old in CUSTOM
    path = write(tmp_path, CUSTOM.replace(old, new, 1))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_unreadable_toml_is_a_profile_error(tmp_path):
    with pytest.raises(ProfileError, match="board.toml"):
        load_profile(write(tmp_path, "id = \n"))
    with pytest.raises(ProfileError):
        load_profile(tmp_path / "missing.toml")


def test_two_default_power_modes_are_refused(tmp_path):
    text = CUSTOM + '[[power_modes]]\nname = "a"\ndefault = true\n[[power_modes]]\nname = "b"\ndefault = true\n'
    with pytest.raises(ProfileError, match="power_modes"):
        load_profile(write(tmp_path, text))


def test_parse_profile_names_its_origin():
    with pytest.raises(ProfileError, match="from-a-dict"):
        parse_profile({"id": "x"}, "from-a-dict")


def test_uncovered_figures_reports_what_no_source_backs(tmp_path):
    profile = load_profile(write(tmp_path, CUSTOM))
    assert uncovered_figures(profile) == ["memory.usable", "cpu.clusters"]
    # a table-level source covers its fields
    text = CUSTOM.replace('figures = ["memory.total", "memory.bandwidth"]', 'figures = ["memory", "cpu"]')
    assert uncovered_figures(load_profile(write(tmp_path, text, "b.toml"))) == []


# --- the `edgellm devices` command ---------------------------------------------------------------------------

def test_devices_json_lists_every_builtin(capsys):
    assert cli.main(["devices", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {row["id"] for row in rows} == set(PROFILES) and REQUIRED_IDS <= set(PROFILES)
    row = next(r for r in rows if r["id"] == "jetson-orin-nano-8gb")
    assert row["memory"]["total"] == 8 * 2**30            # base units
    assert row["memory"]["bandwidth"] == pytest.approx(68e9)
    assert row["first_backend"] == "llama.cpp-cuda" and "jetson-orin" in row["aliases"]


def test_devices_table_has_a_row_per_profile(capsys):
    assert cli.main(["devices"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["ID", "CLASS"]
    assert len(lines) == 1 + len(PROFILES)
    nano = next(line for line in lines if line.startswith("jetson-orin-nano-8gb "))
    assert "4.5 GiB / 8 GiB" in nano and "68 GB/s" in nano and "llama.cpp-cuda" in nano


def test_show_alias_says_which_profile_it_picked(capsys):
    assert cli.main(["devices", "show", "jetson-orin"]) == 0
    captured = capsys.readouterr()
    assert "jetson-orin resolved to jetson-orin-nano-4gb" in captured.err
    assert "jetson-orin-nano-4gb" in captured.out


def test_show_prints_every_field_with_units_and_sources(capsys):
    assert cli.main(["devices", "show", "jetson-orin-nano-super-8gb"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert captured.err == ""                               # an exact id needs no explanation
    for text in ("memory.total", "8 GiB", "memory.bandwidth", "102 GB/s", "cpu.clusters[0].max_clock",
                 "1.728 GHz", "accelerators[0].compute_capability", "8.7", "33.5 TOPS", "power_modes[2].name",
                 "MAXN_SUPER", "918 MHz", "notes:", "sources:", "backs: memory.total"):
        assert text in out, text


def test_show_json_is_the_profile_in_base_units(capsys):
    assert cli.main(["devices", "show", "raspberry-pi-5", "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data == json.loads(json.dumps(PROFILES["raspberry-pi-5-4gb"].to_dict()))   # tuples become lists
    assert "raspberry-pi-5-4gb" in captured.err
    # --json before the subcommand works too
    assert cli.main(["devices", "--json", "show", "apple-m1-8gb"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == "apple-m1-8gb"


def test_show_custom_file(tmp_path, capsys):
    path = write(tmp_path, CUSTOM)
    assert cli.main(["devices", "show", str(path)]) == 0
    captured = capsys.readouterr()
    assert "my-board" in captured.out and "12.8 GB/s" in captured.out
    assert str(path) in captured.err


def test_show_invalid_file_exits_non_zero_naming_the_problem(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EDGELLM_DEBUG", raising=False)
    path = write(tmp_path, CUSTOM.replace('total = "4 GiB"', "total = 8"))
    assert cli.main(["devices", "show", str(path)]) == ProfileError(path="", problem="").exit_code != 0
    err = capsys.readouterr().err
    assert "memory.total" in err and "no unit" in err and "hint:" in err


def test_show_unknown_device_exits_non_zero_naming_it(capsys, monkeypatch):
    monkeypatch.delenv("EDGELLM_DEBUG", raising=False)
    code = cli.main(["devices", "show", "raspbery-pi-5"])
    assert code != 0
    err = capsys.readouterr().err
    assert "'raspbery-pi-5'" in err and "raspberry-pi-5" in err


def test_show_local_goes_through_the_probe(monkeypatch, capsys):
    # The probe is exercised by its own tests; here only the route from the command to local_profile() matters.
    fake = types.ModuleType("edgellm.probe")
    fake.local_profile = lambda: PROFILES["laptop-x86-16gb"]
    monkeypatch.setitem(sys.modules, "edgellm.probe", fake)
    assert cli.main(["devices", "show", "local", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["id"] == "laptop-x86-16gb"
    assert "probe" in captured.err


def test_installed_console_script_lists_devices():
    script = shutil.which("edgellm", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the edgellm console script is not installed next to this interpreter (pip install -e .)")
    result = subprocess.run([script, "devices", "--json"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert REQUIRED_IDS <= {row["id"] for row in json.loads(result.stdout)}
