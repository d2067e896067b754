"""The whole pipeline through the team server (PostgreSQL + moto S3 + `mlflow server`):
a training run whose artifacts and model land in the bucket, a study with its analysis,
promotion, and the champion served from the server's registry over HTTP."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path

import pytest
import requests

from ecg_mlflow import schema
from ecg_mlflow.data.classes import CLASSES
from ecg_mlflow.serving.pyfunc import IMAGE_COLUMN

from infra_fixtures import LOOPBACK_HEX, listening_addresses
from team_study import (
    PAIR_NAMES, SMALL, VENV_BIN, client_env, demo_set, mlflow_client, run_client, team_study,
)

pytestmark = [pytest.mark.infra, pytest.mark.slow, pytest.mark.timeout(1500)]  # the shared team study runs in the first test that needs it
CHAMPION_URI = f"models:/{schema.DEFAULT_MODEL_NAME}@{schema.CHAMPION_ALIAS}"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp()


def bucket_keys(team_server) -> list[str]:
    s3 = team_server.s3()
    keys, token = [], None
    while True:
        page = s3.list_objects_v2(Bucket=team_server.bucket, **({"ContinuationToken": token} if token else {}))
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def logged_model_id(client, run) -> str:
    """The id of the model a run logged (MLflow 3 stores models as LoggedModels)."""
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    assert len(models) == 1, f"run {run.info.run_id} logged {len(models)} models"
    return models[0].model_id


def test_a_training_run_puts_its_artifacts_and_model_in_the_bucket(team_server, base):
    command = [str(VENV_BIN / "ecg-mlflow"), "train", "--arch", "mobilenetv3large", "--seed", "1",
               "--data", str(demo_set(base)), *SMALL, "--cache-dir", str(base / "team-feature-cache"),
               "--experiment", "team-train"]
    done = run_client(command, team_server)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    client = mlflow_client(team_server)
    experiment = client.get_experiment_by_name("team-train")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "mobilenetv3large-s1"
    assert run.data.tags[schema.TAG_ROLE] == schema.ROLE_TRAIN
    assert "test_f1_macro" in run.data.metrics and run.data.params["arch"] == "mobilenetv3large"
    # the server proxies artifacts (--serve-artifacts): the client needs no S3 credentials,
    # and what it logged is in the bucket
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    keys = bucket_keys(team_server)
    run_prefix = f"artifacts/{experiment.experiment_id}/{run.info.run_id}/artifacts/"
    for artifact in schema.TRAIN_RUN_ARTIFACTS:
        assert run_prefix + artifact in keys, f"{artifact} not in the bucket"
    model_prefix = f"artifacts/{experiment.experiment_id}/models/{logged_model_id(client, run)}/artifacts/"
    model_files = {k[len(model_prefix):] for k in keys if k.startswith(model_prefix)}
    assert {"MLmodel", "requirements.txt"} <= model_files
    assert any(f.startswith("data/") and f.endswith(".keras") for f in model_files), model_files

    csv = team_server.s3().get_object(Bucket=team_server.bucket, Key=run_prefix + "test_predictions.csv")
    header = csv["Body"].read().decode().splitlines()[0]
    assert all(column in header for column in schema.PROB_COLUMNS), header


def test_a_study_and_its_analysis_through_the_server(team_server, base):
    study = team_study(team_server, base)
    assert sorted(study.runs) == list(PAIR_NAMES)
    client = mlflow_client(team_server)
    runs = [client.get_run(run_id) for run_id in study.runs.values()]
    assert all(r.info.status == "FINISHED" for r in runs)
    parent = client.get_run(study.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["runs_trained"] == 4 and parent.data.metrics["runs_reused"] == 0
    analysis = client.get_run(study.analysis_run_id)
    assert analysis.info.status == "FINISHED"
    assert analysis.data.tags[schema.TAG_STUDY] == study.parent_run_id
    assert any(key.endswith("_mean_diff") for key in analysis.data.metrics)
    assert "winner:" in study.output and study.analysis_run_id in study.output
    keys = bucket_keys(team_server)
    assert [k for k in keys if f"/{study.analysis_run_id}/artifacts/" in k], "analysis artifacts not in the bucket"


def test_promote_then_serve_the_champion_from_the_registry(team_server, base, real_originals, tmp_path):
    from serving_fixtures import free_port, stop_process_group

    study = team_study(team_server, base)
    # two seeds of random backbones are never significant: --force promotes the better mean
    promoted = run_client([str(VENV_BIN / "ecg-mlflow"), "promote", "--experiment", study.experiment,
                           "--force", "true"], team_server)
    assert promoted.returncode == 0, promoted.stdout[-3000:] + promoted.stderr[-3000:]
    client = mlflow_client(team_server)
    version = client.get_model_version_by_alias(schema.DEFAULT_MODEL_NAME, schema.CHAMPION_ALIAS)
    # the source is the winner's best-validation run (ties: lower validation loss), computed here
    winner = client.get_run(study.analysis_run_id).data.tags[schema.winner_tag("accuracy")]
    candidates = [client.get_run(run_id) for name, run_id in study.runs.items() if name.startswith(f"{winner}-s")]
    assert len(candidates) == 2
    best = min(candidates, key=lambda r: (-r.data.metrics["val_accuracy"], r.data.metrics["val_loss"],
                                          r.info.start_time))
    assert version.tags["arch"] == winner
    assert version.tags[schema.TAG_SOURCE_RUN] == best.info.run_id

    port = free_port()
    log = tmp_path / "serve.log"
    # no --host: the default must be loopback only
    command = ["mlflow", "models", "serve", "-m", CHAMPION_URI, "-p", str(port), "--env-manager", "local"]
    with open(log, "wb") as out:
        server = subprocess.Popen(command, env=client_env(team_server), stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, log.read_text(errors="replace")[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "model server not up:\n" + log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        assert listening_addresses(port) == {LOOPBACK_HEX}

        image = sorted(p for p in real_originals.rglob("*") if p.is_file())[0]
        payload = {"dataframe_records": [{IMAGE_COLUMN: base64.b64encode(image.read_bytes()).decode()}]}
        response = requests.post(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload),
                                 headers={"Content-Type": "application/json"}, timeout=300)
        assert response.status_code == 200, response.text[:2000]
        (prediction,) = response.json()["predictions"]
        assert prediction["label"] in CLASSES
        assert sum(prediction[c] for c in schema.PROB_COLUMNS) == pytest.approx(1.0, abs=1e-5)
    finally:
        stop_process_group(server)
