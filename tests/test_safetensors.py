"""The hand-written safetensors reader/writer: round trips, bf16 bits, and clear errors on bad files."""

import json
import struct

import numpy as np
import pytest

from edgellm import safetensors as st
from edgellm.errors import CheckpointError


def test_round_trip_f32_f16_bf16(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 5)).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float16)
    c = st.f32_to_bf16(rng.standard_normal((2, 4)).astype(np.float32))
    path = tmp_path / "m.safetensors"
    st.write(path, {"a": a, "b": b, "c": c}, dtypes={"c": "BF16"}, metadata={"format": "pt"})
    with st.SafetensorsFile(path) as f:
        assert f.infos["c"].dtype == "BF16" and f.metadata == {"format": "pt"}
        np.testing.assert_array_equal(f.raw("a"), a)
        np.testing.assert_array_equal(f.raw("b"), b)
        np.testing.assert_array_equal(f.raw("c"), c)
        assert f.float32("c").dtype == np.float32
    assert not list(tmp_path.glob("*.partial"))


def test_bf16_rounding_is_nearest_even():
    # 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties go to the even mantissa (1.0)
    values = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.5, np.inf], dtype=np.float32)
    back = st.bf16_to_f32(st.f32_to_bf16(values))
    np.testing.assert_array_equal(back, [1.0, 1.0, 1 + 2**-6, -2.5, np.inf])
    assert np.isnan(st.bf16_to_f32(st.f32_to_bf16(np.array([np.nan], np.float32))))[0]


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    st.write(path, {"w": np.ones((64, 64), np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        st.SafetensorsFile(path)


@pytest.mark.parametrize("blob, problem", [
    (b"\x01\x02", "too short"),
    (struct.pack("<Q", 10**12) + b"{}", "exceeds"),
    (struct.pack("<Q", 4) + b"nope", "not valid JSON"),
])
def test_corrupt_headers_are_refused(tmp_path, blob, problem):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError, match=problem):
        st.SafetensorsFile(path)


def test_shape_that_does_not_match_bytes_is_refused(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(32))
    with pytest.raises(CheckpointError, match="do not hold shape"):
        st.SafetensorsFile(path)
