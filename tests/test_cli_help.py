"""`--help` of every command the CLI group registers (and of every subcommand of a group)
works, exits 0, and describes the command and its options."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ecg_mlflow.cli import COMMAND_GROUP, main

from conftest import PROJECT_ROOT


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


COMMANDS = list(_commands(main))


def test_the_group_registers_every_declared_command():
    declared = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["entry-points"][COMMAND_GROUP]
    assert set(main.commands) == set(declared)
    assert {"train", "study", "analyze", "promote", "tune", "synth", "predict", "data"} <= set(main.commands)


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(path) for path, _ in COMMANDS])
def test_help_of_every_command(path, command):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: main {' '.join(path)}"), result.output[:200]
    assert "Traceback" not in result.output
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.opts[0] in result.output, f"{' '.join(path)}: {param.opts[0]} missing from --help"


def test_help_of_the_console_script_lists_every_command():
    done = subprocess.run([str(Path(sys.executable).parent / "ecg-mlflow"), "--help"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    first_words = {line.split()[0] for line in done.stdout.split("Commands:", 1)[1].splitlines() if line.strip()}
    assert set(main.commands) <= first_words  # (a wrapped help line may add other words)
