"""`ecg-mlflow train` (MLproject `main`): one backbone, one seed, one tracked run."""

from __future__ import annotations

import click

from ecg_mlflow.commands.options import parse_or_exit, reported_errors, stop_on_sigterm, train_options
from ecg_mlflow.tracking.runs import EXPERIMENT_HELP, tracked_run
from ecg_mlflow import schema
from ecg_mlflow.model.backbones import BACKBONES


@click.command()
@click.option("--arch", default="resnet50", show_default=True, help=f"backbone: {', '.join(BACKBONES)}")
@click.option("--seed", default="1", show_default=True, help="run seed: validation draw and head initialisation")
@train_options
@click.option("--experiment", default=schema.DEFAULT_EXPERIMENT, help=EXPERIMENT_HELP)
def train(experiment: str, **raw: str) -> None:
    """Train the head on cached frozen-backbone features and log the run to MLflow."""
    config = parse_or_exit(**raw)
    stop_on_sigterm()
    from ecg_mlflow.train import load_dataset, run_name, train_and_log

    with reported_errors("the run is marked KILLED; the feature cache stays consistent"):
        manifest = load_dataset(config.data)  # bad data fails before a run is opened
        with tracked_run(experiment, run_name(config), {schema.TAG_ROLE: schema.ROLE_TRAIN}):
            train_and_log(config, manifest=manifest)
