"""edgellm.units: quantities as profiles write them ("68 GB/s"), parsed to base units; bare numbers refused."""

import pytest

from edgellm import units
from edgellm.cli.devices import human


@pytest.mark.parametrize("text, kind, expected", [
    ("8 GB", "bytes", 8 * 10**9),                 # decimal prefix: datasheet gigabytes
    ("8 GiB", "bytes", 8 * 2**30),                # binary prefix
    ("512 MiB", "bytes", 512 * 2**20),
    ("1.5 KiB", "bytes", 1536),
    ("100 B", "bytes", 100),
    ("68 GB/s", "bandwidth", 68e9),
    ("204.8 GB/s", "bandwidth", 204.8e9),
    ("1.5 GHz", "frequency", 1.5e9),
    ("624.75 MHz", "frequency", 624.75e6),
    ("40 TOPS", "ops", 40e12),
    ("15 W", "power", 15.0),
    ("8GB", "bytes", 8e9),                        # the space is optional
    ("  2 TB  ", "bytes", 2e12),                  # surrounding blanks are ignored
])
def test_parse_to_base_units(text, kind, expected):
    assert units.parse(text, kind) == pytest.approx(expected)


@pytest.mark.parametrize("value", [8, 8.0, True, None])
def test_bare_numbers_are_refused_with_an_example(value):
    with pytest.raises(units.UnitError, match="has no unit") as info:
        units.parse(value, "bytes")
    assert "GB" in str(info.value)                # the message shows what a valid value looks like


@pytest.mark.parametrize("text, kind", [
    ("8 GB", "bandwidth"),       # a size where a rate is wanted
    ("68 GB/s", "bytes"),        # a rate where a size is wanted
    ("1.5 GHz", "power"),
    ("8 gb", "bytes"),           # prefixes and units are case-sensitive (Mb vs MB would be ambiguous)
    ("8 XB", "bytes"),
    ("eight GB", "bytes"),
    ("-8 GB", "bytes"),
    ("8", "bytes"),              # a number in a string still has no unit
    ("", "bytes"),
])
def test_wrong_or_missing_units_are_refused(text, kind):
    with pytest.raises(units.UnitError) as info:
        units.parse(text, kind)
    assert repr(text) in str(info.value)          # the message names the bad value


def test_unit_error_is_a_value_error():
    assert issubclass(units.UnitError, ValueError)


def test_parse_bytes_returns_whole_bytes():
    assert units.parse_bytes("8 GB") == 8_000_000_000
    assert units.parse_bytes("512 MiB") == 536_870_912
    assert isinstance(units.parse_bytes("0.5 KiB"), int)
    with pytest.raises(units.UnitError):
        units.parse_bytes(1024)


@pytest.mark.parametrize("n, text", [
    (1_500_000_000, "1.50 GB"),
    (999, "999 B"),
    (1000, "1.00 KB"),
    (2 * 10**12, "2.00 TB"),
    (0, "0 B"),
])
def test_format_bytes(n, text):
    assert units.format_bytes(n) == text


@pytest.mark.parametrize("value, kind, text", [
    (8 * 2**30, "bytes", "8 GiB"),
    (4.5 * 2**30, "bytes", "4.5 GiB"),
    (68e9, "bandwidth", "68 GB/s"),
    (17.07e9, "bandwidth", "17.07 GB/s"),
    (1.5104e9, "frequency", "1.51 GHz"),
    (624.75e6, "frequency", "624.75 MHz"),
    (20e12, "ops", "20 TOPS"),
    (15.0, "power", "15 W"),
    (0, "frequency", "0 Hz"),
])
def test_human_units_of_the_devices_command(value, kind, text):
    assert human(value, kind) == text


@pytest.mark.parametrize("value, kind", [
    (8 * 2**30, "bytes"), (2.1 * 2**30, "bytes"), (123_456_789, "bytes"), (102.4e9, "bandwidth"),
    (1.728e9, "frequency"), (33.5e12, "ops"), (7.0, "power"),
])
def test_human_text_parses_back(value, kind):
    # What `devices show` prints can be pasted into a profile file.
    assert units.parse(human(value, kind), kind) == pytest.approx(value, rel=1e-3)
