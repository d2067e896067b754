"""Opening the run a command logs into, the same way inside and outside `mlflow run`."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from ecg_mlflow import names

EXPERIMENT_HELP = f"MLflow experiment (default {names.DEFAULT_EXPERIMENT}; ignored inside `mlflow run`)"


@contextmanager
def tracked_run(experiment: str, run_name: str, tags: dict[str, str]) -> Iterator:
    """The active run: the one `mlflow run` created (MLFLOW_RUN_ID), else a new run in
    `experiment`. Ctrl-C or SIGTERM end it KILLED and an error FAILED, never RUNNING."""
    import mlflow

    if not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment)
    run = mlflow.start_run(run_name=run_name, tags=tags)
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run(status="KILLED")
        raise
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")
