"""`ecg-mlflow tune` (MLproject `tune`): Optuna search over the head on cached features.

One parent run per worker (tag ecg.role=tune) and one nested run per trial that worker
ran. Run several workers with one PostgreSQL `--storage` and `--study-name` to share a
study. The search lives in `ecg_mlflow.tune` (config, space, storage, objective), its runs in
`ecg_mlflow.tune.tracking`.
"""

from __future__ import annotations

from typing import Callable

import click

from ecg_mlflow import schema
from ecg_mlflow.commands.options import TRAIN_OPTIONS, reported_errors, stop_on_sigterm
from ecg_mlflow.tracking.runs import EXPERIMENT_HELP, tracked_run

TUNE_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("n_trials", "30", "trials this worker runs"),
    ("timeout", "0", "stop starting trials after this many seconds (0 = no limit)"),
    ("seeds", "1", "seeds per trial, objective averaged: 1 | 1,2,3 | 1-3"),
    ("storage", "sqlite:///optuna.db", "Optuna storage URL; postgresql+psycopg2://... for parallel workers"),
    ("study_name", "", "Optuna study name (default ecg-head-<arch>); workers sharing it share the study"),
    ("sampler_seed", "0", "TPE seed; trial n samples from (sampler_seed, n)"),
)


def tune_options(func: Callable) -> Callable:
    """The data and preprocessing options of `main` that tuning keeps fixed, then its own."""
    from ecg_mlflow.tune.config import TUNE_TRAIN_FIELDS

    chosen = [o for o in TRAIN_OPTIONS if o[0] in TUNE_TRAIN_FIELDS] + list(TUNE_OPTIONS)
    for name, default, help_text in reversed(chosen):
        flag = "--" + name.replace("_", "-")
        func = click.option(flag, name, default=default, show_default=bool(default), help=help_text)(func)
    return func


@click.command()
@click.option("--arch", default="resnet50", show_default=True, help="backbone name (see `ecg-mlflow backbones`)")
@tune_options
@click.option("--experiment", default=schema.DEFAULT_EXPERIMENT, help=EXPERIMENT_HELP)
def tune(experiment: str, **raw: str) -> None:
    """Tune the head (layer widths, dropout, learning rate, batch size) with Optuna on the
    validation set; logs a parent run with a nested run per trial and best_head.json."""
    from ecg_mlflow.tune.config import parse_tune_config, redact_storage
    from ecg_mlflow.tune.storage import open_study
    from ecg_mlflow.tune.tracking import tune_and_log

    from ecg_mlflow.train import load_dataset

    with reported_errors("the running trial is marked FAIL in the study and its run KILLED"):
        config = parse_tune_config(**raw)
        stop_on_sigterm()
        # Bad data, storage or a study run with other settings fail before a run is opened.
        manifest = load_dataset(config.train.data)
        study, created = open_study(config, manifest.digest)
        tags = {schema.TAG_ROLE: schema.ROLE_TUNE, schema.TAG_TUNE_STUDY: config.study_name,
                schema.TAG_TUNE_CREATED_STUDY: str(created).lower()}
        with tracked_run(experiment, f"tune-{config.study_name}", tags):
            summary = tune_and_log(config, manifest, study=study)
    click.echo(summary.describe(redact_storage(config.storage)))
