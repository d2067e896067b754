"""tracked_run: the run a command logs into lands in the experiment the user named."""

from __future__ import annotations

import mlflow
from mlflow import MlflowClient
from mlflow.tracking._tracking_service.client import TrackingServiceClient

from ecg_mlflow.tracking.runs import tracked_run


def test_runs_land_in_their_experiment_when_another_process_creates_it_at_that_moment(tracking_uri, monkeypatch):
    """Four `train` processes starting at once on a new experiment: the one that loses the
    create race used to log into the Default experiment (seen in the four-process fault test).
    The race is made certain here: the real store already holds the experiment that the
    first lookup does not see yet, so MLflow's create fails with RESOURCE_ALREADY_EXISTS."""
    created = MlflowClient().create_experiment("race")  # by the other process
    real_lookup = TrackingServiceClient.get_experiment_by_name  # what mlflow.set_experiment asks
    lookups = []

    def lookup_just_before_the_other_process_created_it(self, name):
        lookups.append(name)
        return None if len(lookups) == 1 else real_lookup(self, name)

    monkeypatch.setattr(TrackingServiceClient, "get_experiment_by_name", lookup_just_before_the_other_process_created_it)
    with tracked_run("race", "probe", {"ecg.role": "train"}) as run:
        with mlflow.start_run(run_name="child", nested=True) as child:
            pass
    assert lookups[0] == "race"
    client = MlflowClient()
    assert client.get_run(run.info.run_id).info.experiment_id == created
    assert client.get_run(child.info.run_id).info.experiment_id == created
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
