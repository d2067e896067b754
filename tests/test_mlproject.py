"""MLproject stays thin and in step with the CLI: every declared parameter reaches its
command, and every option the command passes exists on the click command it calls."""

from __future__ import annotations

import re
import shlex

import pytest
from mlflow.projects._project_spec import load_project

from ecg_mlflow.cli import main

from conftest import PROJECT_ROOT

PROJECT = load_project(str(PROJECT_ROOT))
ENTRY_POINTS = sorted(PROJECT._entry_points)


def _click_command(command_line: str):
    words = shlex.split(command_line)
    assert words[:2] == ["python", "-m"], command_line
    if words[2] == "analysis":
        from analysis.cli import analyze

        return analyze, words[3:]
    assert words[2] == "ecg_mlflow", command_line
    return main.commands[words[3]], words[4:]


def test_the_paper_entry_points_are_all_there():
    assert {"main", "study", "analyze", "promote", "tune", "synth"} <= set(ENTRY_POINTS)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_parameter_reaches_the_command_and_every_option_exists(name):
    entry = PROJECT.get_entry_point(name)
    placeholders = set(re.findall(r"\{(\w+)\}", entry.command))
    assert placeholders == set(entry.parameters), f"{name}: declared and used parameters differ"
    command, words = _click_command(entry.command)
    options = {opt for param in command.params for opt in param.opts}
    passed = [w for w in words if w.startswith("--")]
    assert passed and set(passed) <= options, f"{name}: unknown options {set(passed) - options}"


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_parameters_are_strings_that_the_cli_validates(name):
    """MLflow checks no int/float types, so every value is a string the command parses."""
    entry = PROJECT.get_entry_point(name)
    for parameter in entry.parameters.values():
        assert parameter.type == "string", f"{name}.{parameter.name}: typed by the CLI, not MLflow"
