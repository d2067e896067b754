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
    `experiment`. Ctrl-C or SIGTERM end it KILLED and an error FAILED, never RUNNING; a
    tracking server that stops answering raises TrackingServerUnavailable after a bounded
    wait (see tracking_server.py)."""
    import mlflow

    from ecg_mlflow.tracking_server import bound_http_retries, end_run_once, is_unreachable, unavailable_error

    bound_http_retries()
    try:
        if not os.environ.get("MLFLOW_RUN_ID"):
            activate_experiment(experiment)
        run = mlflow.start_run(run_name=run_name, tags=tags)
    except Exception as exc:
        if is_unreachable(exc):
            raise unavailable_error(exc) from None
        raise
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run(status="KILLED")
        raise
    except BaseException as exc:
        if is_unreachable(exc):  # one quick try to end it FAILED, not another retry budget
            end_run_once("FAILED")
            raise unavailable_error(exc) from None
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


def activate_experiment(name: str) -> str:
    """Make `name` the active experiment (created if missing) and return its id.

    When another process creates the experiment between MLflow's lookup and its create,
    `mlflow.set_experiment` (3.17) returns the experiment without activating it, and the run
    and its nested runs land in the Default experiment. Activating by id closes that race.
    """
    import mlflow

    experiment_id = mlflow.set_experiment(name).experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id
