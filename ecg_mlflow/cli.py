"""The `ecg-mlflow` command line: one click group, one subcommand per entry point.

Each subcommand lives in `ecg_mlflow/commands/` (or `analysis/cli.py`) and imports heavy
libraries (TensorFlow, MLflow) inside its function, so `--help` stays fast.
"""

from __future__ import annotations

import click

from ecg_mlflow import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ecg-mlflow")
def main() -> None:
    """Transfer-learning study on ECG report images, tracked in MLflow."""


# Subcommands register below, one line each.
from ecg_mlflow.commands.synth import synth  # noqa: E402
main.add_command(synth)
from analysis.cli import analyze  # noqa: E402
main.add_command(analyze)
from ecg_mlflow.commands.train import train  # noqa: E402
main.add_command(train)
from ecg_mlflow.commands.data import data  # noqa: E402
main.add_command(data)
from ecg_mlflow.commands.tune import tune  # noqa: E402
main.add_command(tune)
from ecg_mlflow.commands.study import study  # noqa: E402
main.add_command(study)
from ecg_mlflow.commands.promote import promote  # noqa: E402
main.add_command(promote)
from ecg_mlflow.commands.predict import predict  # noqa: E402
main.add_command(predict)
from ecg_mlflow.commands.features import features  # noqa: E402
main.add_command(features)
