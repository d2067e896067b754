"""infra/local really starts PostgreSQL 15, moto's S3 server and MLflow, and stops them.

The tests that only look use the session's shared server; the tests that stop, restart or take
down services use this module's own (`private_team_server`), so the shared bucket keeps its objects.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from infra_fixtures import (
    INFRA_LOCAL, LOOPBACK_HEX, SERVICES, listening_addresses, parse_up_output, require_infra,
)

pytestmark = pytest.mark.infra



def psycopg2_dsn(sqlalchemy_uri: str) -> str:
    return sqlalchemy_uri.replace("postgresql+psycopg2://", "postgresql://", 1)


def answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def port_of(uri: str) -> int:
    return int(uri.rsplit(":", 1)[1].split("/")[0])


def pids(server) -> dict[str, str]:
    return {s: (server.state_dir / f"{s}.pid").read_text() for s in SERVICES}


def log_run_with_artifact(tracking_uri: str, tmp_path: Path, text: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("infra-test") or None
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("infra-test")
    run = client.create_run(experiment_id, run_name="infra-probe")
    payload = tmp_path / "probe.txt"
    payload.write_text(text)
    client.log_artifact(run.info.run_id, str(payload), artifact_path="probe")
    client.log_metric(run.info.run_id, "probe_metric", 1.5)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_up_prints_settings_and_all_three_services_answer(team_server):
    import psycopg2

    for database_uri in (team_server.postgres_uri, team_server.optuna_storage):
        conn = psycopg2.connect(psycopg2_dsn(database_uri), connect_timeout=5)
        with conn, conn.cursor() as cur:
            cur.execute("SELECT current_database(), version()")
            name, version = cur.fetchone()
        conn.close()
        assert name == database_uri.rsplit("/", 1)[1]
        assert version.startswith("PostgreSQL 15")
    team_server.s3().head_bucket(Bucket=team_server.bucket)
    assert answers_http(f"{team_server.tracking_uri}/health")
    env_file = (team_server.state_dir / "env").read_text()
    assert f"export MLFLOW_TRACKING_URI={team_server.tracking_uri}\n" in env_file


def test_every_service_listens_on_loopback_only(team_server):
    for uri in (team_server.tracking_uri, team_server.s3_endpoint, team_server.postgres_uri):
        assert "@127.0.0.1:" in uri or "//127.0.0.1:" in uri
        addresses = listening_addresses(port_of(uri))
        assert addresses, f"nothing listens on the port of {uri}"
        assert addresses <= {LOOPBACK_HEX}, f"{uri} listens on {addresses}"


def test_run_artifacts_land_in_the_s3_bucket_through_the_server(team_server, tmp_path):
    run_id = log_run_with_artifact(team_server.tracking_uri, tmp_path, "ecg through the server")
    s3 = team_server.s3()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=team_server.bucket).get("Contents", [])]
    matching = [k for k in keys if run_id in k and k.endswith("probe/probe.txt")]
    assert matching, f"no object for run {run_id} in {keys}"
    body = s3.get_object(Bucket=team_server.bucket, Key=matching[0])["Body"].read()
    assert body == b"ecg through the server"


def test_up_again_is_idempotent(team_server):
    before = pids(team_server)
    settings = dict(team_server.settings)
    team_server.up()
    assert team_server.settings == settings
    assert pids(team_server) == before


def test_restart_postgres_keeps_the_address_and_the_server_recovers(private_team_server, tmp_path):
    from mlflow import MlflowClient

    old_pid = pids(private_team_server)["postgres"]
    settings = dict(private_team_server.settings)
    private_team_server.restart("postgres")
    assert pids(private_team_server)["postgres"] != old_pid
    private_team_server.up()
    assert private_team_server.settings == settings
    # The MLflow server keeps running and reaches the restarted database (pool reconnects).
    run_id = log_run_with_artifact(private_team_server.tracking_uri, tmp_path, "after restart")
    assert MlflowClient(private_team_server.tracking_uri).get_run(run_id).data.metrics["probe_metric"] == 1.5


def test_stopped_mlflow_refuses_then_starts_again_with_its_runs(private_team_server, tmp_path):
    from mlflow import MlflowClient

    run_id = log_run_with_artifact(private_team_server.tracking_uri, tmp_path, "before stop")
    private_team_server.stop("mlflow")
    assert not answers_http(f"{private_team_server.tracking_uri}/health")
    assert not (private_team_server.state_dir / "mlflow.pid").exists()
    private_team_server.start("mlflow")
    assert answers_http(f"{private_team_server.tracking_uri}/health")
    assert MlflowClient(private_team_server.tracking_uri).get_run(run_id).info.status == "FINISHED"


def test_down_stops_all_three_is_safe_twice_and_up_keeps_the_database(private_team_server, tmp_path):
    import psycopg2
    from mlflow import MlflowClient

    run_id = log_run_with_artifact(private_team_server.tracking_uri, tmp_path, "survives down")
    private_team_server.down(purge=False)
    assert not answers_http(f"{private_team_server.tracking_uri}/health")
    for uri in (private_team_server.tracking_uri, private_team_server.s3_endpoint, private_team_server.postgres_uri):
        assert not listening_addresses(port_of(uri)), f"{uri} still listens after down"
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(psycopg2_dsn(private_team_server.postgres_uri), connect_timeout=3)
    private_team_server.down(purge=False)  # second down: nothing to stop, still exit 0
    private_team_server.up()
    # PostgreSQL's data persists across down/up (moto's S3 objects do not: it is in-memory).
    assert MlflowClient(private_team_server.tracking_uri).get_run(run_id).data.metrics["probe_metric"] == 1.5
    private_team_server.s3().head_bucket(Bucket=private_team_server.bucket)


def test_a_service_that_cannot_start_gives_one_error_with_its_log_tail(tmp_path):
    """moto cannot bind an address this machine does not own: `up` names s3 and shows its log."""
    require_infra()
    state = tmp_path / "broken"
    state.mkdir()
    (state / "ports.json").write_text(json.dumps({"postgres": 1, "s3": 45999, "mlflow": 2}))
    result = subprocess.run(
        [str(INFRA_LOCAL / "up"), "--only", "s3"],
        env={**os.environ, "ECG_MLFLOW_INFRA_DIR": str(state), "ECG_MLFLOW_INFRA_HOST": "192.0.2.1",
             "ECG_MLFLOW_INFRA_TIMEOUT": "60"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "MLFLOW_TRACKING_URI=" not in result.stdout
    assert result.stderr.startswith("infra/local: s3 exited during start-up")
    assert str(state / "s3.log") in result.stderr
    assert "Cannot assign requested address" in result.stderr  # the log tail: moto's own words
    assert not (state / "s3.pid").exists()


def test_parse_up_output_names_missing_lines():
    with pytest.raises(RuntimeError, match="ECG_MLFLOW_OPTUNA_STORAGE"):
        parse_up_output("MLFLOW_TRACKING_URI=http://127.0.0.1:1\nMLFLOW_S3_ENDPOINT_URL=x\n"
                        "ECG_MLFLOW_S3_BUCKET=b\nECG_MLFLOW_POSTGRES_URI=p\n")
