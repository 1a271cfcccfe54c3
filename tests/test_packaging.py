"""What ships must work from an installed package: the wheel holds every module and data file."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# source folder -> where it lands in the installed package
SHIPPED = {"edgellm": "edgellm", "converters": "edgellm/converters", "targets": "edgellm/targets"}


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = out.glob("edgellm-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def _source_files(pattern: str) -> list[str]:
    files = []
    for folder, target in SHIPPED.items():
        for path in (ROOT / folder).rglob(pattern):
            if "__pycache__" not in path.parts:
                files.append(f"{target}/{path.relative_to(ROOT / folder).as_posix()}")
    return files


def test_wheel_holds_every_module(wheel_names):
    missing = [f for f in _source_files("*.py") if f not in wheel_names]
    assert not missing, f"modules missing from the wheel (add their package to pyproject.toml): {missing}"


def test_wheel_holds_profiles_and_data(wheel_names):
    data = _source_files("*.toml") + _source_files("*.txt")
    assert any(f.startswith("edgellm/targets/profiles/") for f in data)
    missing = [f for f in data if f not in wheel_names]
    assert not missing, f"data files missing from the wheel: {missing}"


def test_console_script_declared(wheel_names):
    entry_points = next(n for n in wheel_names if n.endswith("entry_points.txt"))
    assert entry_points
