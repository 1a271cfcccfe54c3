"""The CLI shell: only working commands are listed, errors become one-line messages with a hint."""

import pytest

from edgellm import cli
from edgellm.errors import MESSAGES, EdgeLLMError, UnknownDeviceError


def test_help_lists_only_registered_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_every_error_class_has_a_message_row():
    subclasses = set()
    stack = [EdgeLLMError]
    while stack:
        for sub in stack.pop().__subclasses__():
            subclasses.add(sub)
            stack.append(sub)
    assert subclasses <= set(MESSAGES)


def test_error_message_names_value_and_next_step():
    error = UnknownDeviceError(name="jetson-nanoo", known=["jetson-orin-nano-8gb", "raspberry-pi-5"])
    assert "jetson-nanoo" in str(error)
    assert "jetson-orin-nano-8gb" in error.hint
    assert error.exit_code != 0


def test_library_error_becomes_message_and_exit_code(capsys, monkeypatch):
    monkeypatch.delenv("EDGELLM_DEBUG", raising=False)
    code = cli.main(["devices", "show", "no-such-device"])
    err = capsys.readouterr().err
    assert code == UnknownDeviceError(name="", known=[]).exit_code
    assert "no-such-device" in err and "hint:" in err
    assert "Traceback" not in err


def test_debug_shows_traceback(capsys, monkeypatch):
    monkeypatch.setenv("EDGELLM_DEBUG", "1")
    cli.main(["devices", "show", "no-such-device"])
    assert "Traceback" in capsys.readouterr().err
