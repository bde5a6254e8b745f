"""Every subcommand parses and prints its help (catches import errors and broken parsers)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from crossvlm.cli import build_parser


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_top_level_help_runs_as_console_script():
    out = subprocess.run([sys.executable, "-m", "crossvlm.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in _subcommands():
        assert name in out.stdout


@pytest.mark.parametrize("name", _subcommands())
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([name, "--help"])
    assert exit_.value.code == 0
    assert "usage: crossvlm " + name in capsys.readouterr().out


def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    from crossvlm.cli import main

    code = main(["chat", "--model", str(tmp_path / "nope"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("crossvlm chat: error:") and "nope" in err
