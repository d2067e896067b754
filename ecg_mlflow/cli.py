"""The `ecg-mlflow` command line: one click group, one subcommand per entry point.

Each subcommand lives in `ecg_mlflow/commands/` (or `analysis/cli.py`), is declared in the
entry-point group COMMAND_GROUP, and imports heavy libraries (TensorFlow, MLflow) inside its
function, so `--help` stays fast.
"""

from __future__ import annotations

import click

from ecg_mlflow import __version__
from ecg_mlflow.model.backend import BackendMissingError, check_backend_installed, request_xla_determinism


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ecg-mlflow")
def main() -> None:
    """Transfer-learning study on ECG report images, tracked in MLflow."""
    # Before any subcommand imports Keras: a missing backend is one line naming the extras,
    # and XLA reads its determinism flag only when JAX starts.
    try:
        check_backend_installed()
    except BackendMissingError as exc:
        raise click.ClickException(str(exc)) from None
    request_xla_determinism()


COMMAND_GROUP = "ecg_mlflow.commands"
"""Entry-point group of the subcommands (pyproject.toml): this package's own, and `analyze`
from the analysis package, which reads tracked runs and which nothing here imports."""


def register_commands(group: click.Group) -> click.Group:
    """Add every subcommand declared in COMMAND_GROUP, in name order."""
    from importlib.metadata import entry_points

    for entry in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        group.add_command(entry.load(), entry.name)
    return group


register_commands(main)
