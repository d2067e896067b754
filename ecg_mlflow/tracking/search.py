"""Finding runs: experiments by name, runs by id and role, every run of a filter, the latest
run of a role. The one place that builds MLflow search filters, so quoting is done once."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ecg_mlflow import schema

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

LATEST = "latest"
"""What a user passes instead of a run id to mean the newest run of the role asked for."""


class RunNotFound(ValueError):
    """The experiment or run named by the user does not exist, or is not the kind asked for."""


class ExperimentNotFound(RunNotFound):
    """The experiment named by the user does not exist."""


def filter_quote(value: str) -> str:
    """A value as a quoted literal of an MLflow search filter (`tags.x = 'value'`)."""
    return "'" + str(value).replace("'", "\\'") + "'"


def role_filter(role: str, *, finished: bool = False) -> str:
    """The filter of runs tagged ecg.role=`role` (and FINISHED, if asked)."""
    text = f"tags.`{schema.TAG_ROLE}` = {filter_quote(role)}"
    return text + " and attributes.status = 'FINISHED'" if finished else text


def find_experiment_id(client: MlflowClient, experiment: str) -> str:
    """The id of the experiment named `experiment`; ExperimentNotFound lists the ones that exist."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        known = sorted(e.name for e in client.search_experiments())
        raise ExperimentNotFound(
            f"unknown experiment {experiment!r}; experiments in this tracking store: "
            f"{', '.join(known) or '(none)'}"
        )
    return found.experiment_id


def find_run_of_role(client: MlflowClient, experiment_id: str, run_id: str, role: str) -> Run:
    """The run `run_id`, checked to carry tag ecg.role=`role` and to belong to the experiment
    the user named, so that a pasted id of the wrong run is refused rather than misread."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise RunNotFound(f"{role} run {run_id!r} not found in the tracking store") from None
    found = run.data.tags.get(schema.TAG_ROLE)
    if found != role:
        article = "an" if role[0] in "aeiou" else "a"
        raise RunNotFound(f"run {run_id} is not {article} {role} run: tag {schema.TAG_ROLE} is {found!r}, "
                          f"expected {role!r}")
    if run.info.experiment_id != experiment_id:
        raise RunNotFound(f"run {run_id} belongs to experiment id {run.info.experiment_id}, not to the "
                          f"requested experiment (id {experiment_id})")
    return run


def latest_run_of_role(client: MlflowClient, experiment_id: str, role: str, *, finished: bool = False) -> Run | None:
    """The newest run tagged ecg.role=`role` (FINISHED only, if asked), or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=role_filter(role, finished=finished),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def search_all_runs(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
    """Every run that matches, page by page (one search returns at most 1000)."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs
