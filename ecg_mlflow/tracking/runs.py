"""Opening the run a command logs into, the same way inside and outside `mlflow run`, and
ending a run on an error: the one rule for train, study children, tune trials and analyze."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from ecg_mlflow import schema
from ecg_mlflow.tracking.server import bound_http_retries, end_run_once, is_unreachable, unavailable_error

EXPERIMENT_HELP = f"MLflow experiment (default {schema.DEFAULT_EXPERIMENT}; ignored inside `mlflow run`)"


def end_run_on_error(exc: BaseException) -> None:
    """End the active run as `exc` says: KILLED for Ctrl-C or SIGTERM, FAILED otherwise.

    When the tracking server is what failed, one quick try with no retries (see
    server.end_run_once), so a gone server costs one retry budget, not two."""
    import mlflow

    status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
    if is_unreachable(exc):
        end_run_once(status)
    else:
        mlflow.end_run(status=status)


@contextmanager
def ended_by_outcome() -> Iterator[None]:
    """End the active run FINISHED when the block completes, else by end_run_on_error; a
    gone server is re-raised as one TrackingServerUnavailable."""
    import mlflow

    try:
        yield
    except BaseException as exc:
        end_run_on_error(exc)
        if is_unreachable(exc) and not isinstance(exc, KeyboardInterrupt):
            raise unavailable_error(exc) from None
        raise
    mlflow.end_run(status="FINISHED")


@contextmanager
def tracked_run(experiment: str, run_name: str, tags: dict[str, str], *, nested: bool = False) -> Iterator:
    """The active run: the one `mlflow run` created (MLFLOW_RUN_ID), else a new run in
    `experiment` (a child of the active run if `nested`). Ctrl-C or SIGTERM end it KILLED and
    an error FAILED, never RUNNING; a tracking server that stops answering raises
    TrackingServerUnavailable after a bounded wait (see server.py)."""
    import mlflow

    bound_http_retries()
    try:
        if not os.environ.get("MLFLOW_RUN_ID"):
            activate_experiment(experiment)
        run = mlflow.start_run(run_name=run_name, tags=tags, nested=nested)
    except Exception as exc:
        if is_unreachable(exc):
            raise unavailable_error(exc) from None
        raise
    with ended_by_outcome():
        yield run


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
