"""Optuna tuning of the head: search space, seeding, pruning inside Keras, the `tune`
command on SQLite, two parallel workers on a real PostgreSQL, and the tuned head honoured
by a real training run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from ecg_mlflow import schema
from ecg_mlflow.tune import config as tune_config
from ecg_mlflow.tune import objective as tune_objective
from ecg_mlflow.tune import space as tune_space
from ecg_mlflow.tune import storage as tune_storage
from ecg_mlflow.config import HEAD_FIELDS, ConfigError
from ecg_mlflow.model.head import HeadConfig

from conftest import PROJECT_ROOT
from team_study import demo_set

ECG_MLFLOW = str(Path(sys.executable).with_name("ecg-mlflow"))
TINY = {  # tiny synthetic images through a real backbone, short head training
    "arch": "vgg16", "weights": "none", "image_height": "64", "image_width": "128",
    "max_epochs": "4", "patience": "2",
}


def tiny_args(data: Path, cache: Path, **extra: str) -> list[str]:
    options = {**TINY, "data": str(data), "cache_dir": str(cache), **extra}
    return [arg for key, value in options.items() for arg in ("--" + key.replace("_", "-"), value)]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return demo_set(tmp_path_factory.getbasetemp())


def quadratic(trial) -> float:
    """A cheap objective over the real search space, for sampler tests."""
    head = tune_space.suggest_head(trial, HeadConfig())
    return (np.log10(head.learning_rate) + 3) ** 2 + head.dropout + head.dense_units[0] / 1024


# --- parsing and the entry point ------------------------------------------------------

@pytest.mark.parametrize("raw, seeds", [("1", (1,)), ("1,2,3", (1, 2, 3)), ("1-3", (1, 2, 3)),
                                        (" 4 - 5 , 9", (4, 5, 9))])
def test_seeds_forms(raw, seeds):
    assert tune_config.parse_seeds(raw) == seeds


@pytest.mark.parametrize("raw, message", [("3-1", "runs backwards"), ("1,1", "distinct"),
                                          ("a", "seeds must look like"), ("", "seeds must look like")])
def test_bad_seeds_name_the_parameter(raw, message):
    with pytest.raises(ConfigError, match=message):
        tune_config.parse_seeds(raw)


@pytest.mark.parametrize("option, value, fragment", [
    ("--n-trials", "0", "n_trials must be at least 1"),
    ("--n-trials", "ten", "n_trials must be an integer"),
    ("--timeout", "-5", "timeout must be a non-negative"),
    ("--seeds", "2-1", "seeds: range"),
    ("--storage", "redis://localhost/0", "storage must be an SQLAlchemy URL"),
    ("--storage", "postgresql+psycopg2://u:hunter2@127.0.0.1:1/db", "storage must not carry a password"),
    ("--storage", "postgresql://u:hunter2/x@127.0.0.1:1/db", "storage must not carry a password"),
    ("--storage", "postgresql://u:hunter2@x@127.0.0.1:1/db", "storage must not carry a password"),
    ("--study-name", "a b", "study_name may hold"),
    ("--max-epochs", "0", "max_epochs must be at least 1"),
    ("--arch", "alexnet", "arch must be one of"),
])
def test_bad_values_fail_with_one_line_naming_the_parameter(option, value, fragment, tmp_path, synthetic):
    from ecg_mlflow.cli import main

    args = ["tune", "--data", str(synthetic), "--storage", f"sqlite:///{tmp_path}/o.db", option, value]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert "hunter2" not in result.output  # the password never reaches the terminal


def test_redacted_storage_hides_the_password():
    assert tune_config.redact_storage("postgresql+psycopg2://ecg:s3cret@127.0.0.1:5432/optuna") == (
        "postgresql+psycopg2://ecg:***@127.0.0.1:5432/optuna")
    for password in ("hunter2/x", "hun@ter2", "a/b@c:d", "%2F"):
        redacted = tune_config.redact_storage(f"postgresql://ecg:{password}@db.example:5432/optuna")
        assert redacted == "postgresql://ecg:***@db.example:5432/optuna", password
    assert tune_config.redact_storage("postgresql://ecg@db.example:5432/optuna") == "postgresql://ecg@db.example:5432/optuna"


def test_the_password_comes_from_the_environment_or_a_file(tmp_path):
    url = "postgresql+psycopg2://ecg@db.example:5432/optuna"
    assert tune_config.connection_url(url, {}) == url
    connect = tune_config.connection_url(url, {tune_config.PASSWORD_ENV: "p/ss@rd"})
    from sqlalchemy.engine import make_url

    assert make_url(connect).password == "p/ss@rd" and make_url(connect).host == "db.example"
    secret = tmp_path / "optuna-password"
    secret.write_text("from-file\n")
    assert make_url(tune_config.connection_url(url, {tune_config.PASSWORD_FILE_ENV: str(secret)})).password == "from-file"
    with pytest.raises(ConfigError, match=f"^{tune_config.PASSWORD_FILE_ENV}: cannot read"):
        tune_config.storage_password({tune_config.PASSWORD_FILE_ENV: str(tmp_path / "missing")})
    assert tune_config.parse_tune_config(storage=url).as_params()["storage"] == url


def test_a_refused_connection_never_shows_the_password(tmp_path, synthetic, monkeypatch):
    from ecg_mlflow.cli import main

    monkeypatch.setenv(tune_config.PASSWORD_ENV, "hunter2/x@y")
    args = ["tune", "--data", str(synthetic), "--storage", "postgresql+psycopg2://u@127.0.0.1:1/db"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "storage: cannot open 'postgresql+psycopg2://u@127.0.0.1:1/db'" in result.output
    assert "hunter2" not in result.output


@pytest.mark.slow
def test_mlflow_run_tune_refuses_a_password_in_the_url_and_logs_none_from_the_environment(
        synthetic, tracking_uri, tmp_path):
    import mlflow

    from serving_fixtures import server_env

    def mlflow_run(storage: str, env: dict[str, str]) -> subprocess.CompletedProcess:
        command = ["mlflow", "run", str(PROJECT_ROOT), "-e", "tune", "--env-manager", "local",
                   "--experiment-name", "tune-secrets", "-P", f"data={synthetic}", "-P", "weights=none",
                   "-P", "arch=vgg16", "-P", f"storage={storage}"]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)

    env = server_env(tracking_uri)
    refused = mlflow_run("postgresql+psycopg2://u:hunter2@127.0.0.1:1/db", env)
    assert refused.returncode != 0
    assert "storage must not carry a password" in refused.stderr + refused.stdout

    env[tune_config.PASSWORD_ENV] = "hunter2"
    unreachable = mlflow_run("postgresql+psycopg2://u@127.0.0.1:1/db", env)
    assert unreachable.returncode != 0 and "storage: cannot open" in unreachable.stderr + unreachable.stdout
    assert "hunter2" not in unreachable.stderr + unreachable.stdout
    runs = mlflow.search_runs(experiment_names=["tune-secrets"], output_format="list")
    assert len(runs) == 2
    clean = [r for r in runs if "hunter2" not in json.dumps([r.data.params, r.data.tags])]
    assert len(clean) == 1 and clean[0].data.params["storage"] == "postgresql+psycopg2://u@127.0.0.1:1/db"


def test_mlproject_tune_passes_every_parameter_to_the_cli():
    from ecg_mlflow.commands.tune import tune

    entry = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())["entry_points"]["tune"]
    params = entry["parameters"]
    options = {p.name for p in tune.params} - {"experiment"}
    assert set(params) == options
    for name, spec in params.items():
        assert spec["type"] == "string"
        assert f"--{name.replace('_', '-')} {{{name}}}" in entry["command"]
    assert (params["n_trials"]["default"], params["timeout"]["default"], params["seeds"]["default"]) == ("30", "0", "1")
    assert params["storage"]["default"].startswith("sqlite:///")


# --- search space and sampler ---------------------------------------------------------

def test_search_space_second_layer_may_be_absent_and_params_round_trip():
    import optuna

    one = tune_space.suggest_head(optuna.trial.FixedTrial(
        {"units_1": 256, "units_2": 0, "dropout": 0.1, "learning_rate": 3e-4, "batch_size": 32}), HeadConfig())
    assert one.dense_units == (256,) and one.batch_size == 32 and one.learning_rate == 3e-4
    paper = HeadConfig()
    assert tune_space.head_from_params(tune_space.params_from_head(paper), paper) == paper
    assert tune_space.head_from_params(tune_space.params_from_head(one), paper) == one


def test_trial_seeded_sampler_reproduces_a_study_and_parallel_workers_never_repeat():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def params_of(study):
        return [tuple(sorted(t.params.items())) for t in study.trials]

    runs = []
    for _ in range(2):
        study = optuna.create_study(sampler=tune_storage.make_sampler(7))
        study.optimize(quadratic, n_trials=14)  # past the start-up trials, into TPE proper
        runs.append(params_of(study))
    assert runs[0] == runs[1]

    def interleaved(make):
        """Two workers, same seed, one storage, taking turns (as parallel workers do)."""
        storage = optuna.storages.InMemoryStorage()
        workers = [optuna.create_study(storage=storage, study_name="s", sampler=make(), load_if_exists=True)
                   for _ in range(2)]
        for _ in range(4):
            for worker in workers:
                worker.optimize(quadratic, n_trials=1)
        return params_of(workers[0])

    plain = interleaved(lambda: optuna.samplers.TPESampler(seed=7))
    assert len(set(plain)) < len(plain)  # the hazard: equal seeds replay one random sequence
    ours = interleaved(lambda: tune_storage.make_sampler(7))
    assert len(set(ours)) == len(ours) == 8


# --- pruning inside Keras -------------------------------------------------------------

def blob_seed_data(seed: int) -> tune_objective.SeedData:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, 60)
    x = (rng.normal(0, 2, (4, 8))[labels] + rng.normal(0, 1, (60, 8))).astype(np.float32)
    y = np.eye(4, dtype=np.float32)[labels]
    return tune_objective.SeedData(seed, x[:40], y[:40], x[40:], y[40:])


def test_pruning_propagates_out_of_keras_and_leaves_no_run_half_logged(tracking_uri, tmp_path):
    import mlflow
    import optuna

    from ecg_mlflow.tune.objective import tracked_objective

    config = tune_config.parse_tune_config(max_epochs="30", patience="30", seeds="1,2",
                                      storage=f"sqlite:///{tmp_path}/o.db", study_name="prune")
    # Any validation loss above 0 is "too high" once step 3 is reached: prune at epoch 3.
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0, n_warmup_steps=3))
    with mlflow.start_run() as parent:
        study.optimize(tracked_objective(config, [blob_seed_data(1), blob_seed_data(2)]), n_trials=1)
        assert mlflow.active_run().info.run_id == parent.info.run_id  # the nested run was closed
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert sorted(trial.intermediate_values) == [1, 2, 3]
    client = mlflow.MlflowClient()
    run = client.get_run(trial.user_attrs[tune_objective.MLFLOW_RUN_ATTR])
    assert run.info.status == "FINISHED"
    assert run.data.tags[schema.TAG_TUNE_STATE] == schema.TUNE_STATE_PRUNED
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.metrics["pruned"] == 1 and run.data.metrics["pruned_epoch"] == 3
    assert run.data.metrics["pruned_value"] == pytest.approx(trial.intermediate_values[3])
    for seed in (1, 2):  # the seeds train together: pruning at epoch 3 stops both there
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"seed{seed}/val_loss")] == [1, 2, 3]
    assert "val_loss" not in run.data.metrics  # no objective for a trial that did not finish


def test_seeds_are_scored_on_their_own_validation_draws_and_averaged(synthetic, tmp_path):
    import optuna

    from ecg_mlflow.data.splits import make_split
    from ecg_mlflow.train import load_dataset, prepare_features

    config = tune_config.parse_tune_config(**TINY, data=str(synthetic), cache_dir=str(tmp_path / "cache"),
                                      seeds="1,2", storage=f"sqlite:///{tmp_path}/o.db")
    manifest = load_dataset(str(synthetic), progress=False)
    prepared = prepare_features(config.train, manifest, make_split(manifest, "paper", 1), progress=False)
    rows = tune_objective.seed_data(prepared, config.seeds)
    for seed_rows in rows:
        split = make_split(manifest, "paper", seed_rows.seed)
        assert len(seed_rows.x_val) == len(split.val) and len(seed_rows.x_train) == len(split.train)
    assert not np.array_equal(rows[0].x_val, rows[1].x_val)  # each seed draws its own validation set
    study = optuna.create_study()
    trial = study.ask()
    score = tune_objective.score_head(trial, HeadConfig(dense_units=(16,), max_epochs=3, patience=2), rows)
    assert score.value == pytest.approx(np.mean(list(score.val_loss.values())))
    assert set(score.val_loss) == {1, 2}


def test_a_trial_reports_the_mean_best_validation_loss_so_far_and_ends_on_its_objective():
    """Seeds train together: each seed's score is the head train_head gives it alone, and
    the value reported per epoch is the mean over seeds of the best validation loss so far,
    which at the last epoch is the trial's objective."""
    import optuna

    from ecg_mlflow.model.head import train_head
    from ecg_mlflow.model.seed_heads import CURVE_TOLERANCE

    data = [blob_seed_data(1), blob_seed_data(2), blob_seed_data(3)]
    config = HeadConfig(dense_units=(16,), max_epochs=12, patience=2, learning_rate=3e-3)
    study = optuna.create_study()
    trial = study.ask()
    score = tune_objective.score_head(trial, config, data)
    study.tell(trial, score.value)
    alone = {d.seed: train_head(d.x_train, d.y_train, d.x_val, d.y_val, config, d.seed)[1] for d in data}
    for seed, history in alone.items():
        assert score.stopped_epoch[seed] == history.stopped_epoch
        assert score.val_loss[seed] == pytest.approx(min(history.val_loss), abs=CURVE_TOLERANCE)
    reported = study.trials[0].intermediate_values
    last = max(h.stopped_epoch for h in alone.values())
    assert sorted(reported) == list(range(1, last + 1))
    for epoch, value in reported.items():
        expected = np.mean([min(h.val_loss[:epoch]) for h in alone.values()])
        assert value == pytest.approx(expected, abs=CURVE_TOLERANCE)
    assert reported[last] == pytest.approx(score.value)


# --- the command, SQLite, one worker at a time ---------------------------------------

def runs_of(experiment: str):
    import mlflow

    return mlflow.MlflowClient().search_runs(
        [mlflow.get_experiment_by_name(experiment).experiment_id], max_results=1000)


def check_trial_runs(runs, study, parents: dict[str, list[int]]) -> None:
    """Every trial of `study` has exactly one MLflow run, under the worker that ran it."""
    trial_runs = [r for r in runs if r.data.tags.get(schema.TAG_ROLE) == schema.ROLE_TUNE_TRIAL
                  and r.data.tags.get(schema.TAG_TUNE_STUDY) == study.study_name]
    numbers = sorted(int(r.data.tags[schema.TAG_TUNE_TRIAL]) for r in trial_runs)
    assert numbers == sorted(t.number for t in study.trials)
    owner = {n: parent for parent, ran in parents.items() for n in ran}
    for run in trial_runs:
        number = int(run.data.tags[schema.TAG_TUNE_TRIAL])
        assert run.data.tags["mlflow.parentRunId"] == owner[number]
        assert study.trials[number].user_attrs[tune_objective.MLFLOW_RUN_ATTR] == run.info.run_id
        assert run.info.status == "FINISHED"
        assert run.data.tags[schema.TAG_TUNE_STATE] in (schema.TUNE_STATE_COMPLETE, schema.TUNE_STATE_PRUNED)
        assert not [k for k in run.data.metrics if k.startswith("test_")]  # never the test set
        if run.data.tags[schema.TAG_TUNE_STATE] == schema.TUNE_STATE_COMPLETE:
            assert run.data.metrics["val_loss"] == pytest.approx(study.trials[number].value)


def worker_trials(run) -> list[int]:
    import mlflow

    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="worker_trials.json")
    return json.loads(Path(path).read_text())["trials"]


def best_head_of(run) -> dict:
    import mlflow

    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=schema.ARTIFACT_BEST_HEAD)
    return json.loads(Path(path).read_text())


def expected_best_head(study) -> dict:
    best = study.best_params
    units = [best["units_1"]] + ([best["units_2"]] if best["units_2"] else [])
    return {"dense_units": units, "dropout": best["dropout"],
            "learning_rate": best["learning_rate"], "batch_size": best["batch_size"]}


def test_sqlite_workers_share_a_study_reuse_the_cache_and_the_tuned_head_trains(
        synthetic, tracking_uri, tmp_path):
    import mlflow
    import optuna

    from ecg_mlflow.cli import main
    from ecg_mlflow.config import resolve_train_config
    from ecg_mlflow.train import train_and_log

    storage = f"sqlite:///{tmp_path}/optuna.db"
    cache = tmp_path / "cache"
    common = ["tune", *tiny_args(synthetic, cache), "--storage", storage, "--study-name", "solo",
              "--seeds", "1,2", "--experiment", "tune-sqlite"]
    for n_trials in ("3", "2"):  # two workers, one after the other, same study
        result = CliRunner().invoke(main, [*common, "--n-trials", n_trials])
        assert result.exit_code == 0, result.output
    assert "train with it: ecg-mlflow train --head-config runs:/" in result.output

    study = optuna.load_study(study_name="solo", storage=storage)
    assert len(study.trials) == 5
    assert all(t.state.is_finished() for t in study.trials)
    assert study.trials[0].params == tune_space.params_from_head(HeadConfig())  # the paper's head, as baseline
    runs = runs_of("tune-sqlite")
    parents = sorted((r for r in runs if r.data.tags.get(schema.TAG_ROLE) == schema.ROLE_TUNE),
                     key=lambda r: r.info.start_time)
    assert [worker_trials(p) for p in parents] == [[0, 1, 2], [3, 4]]
    # The first worker ran the backbone once per image, the second none at all.
    assert [p.data.metrics["cache_misses"] for p in parents] == [24, 0]
    assert parents[1].data.metrics["cache_hits"] == 24
    check_trial_runs(runs, study, {p.info.run_id: worker_trials(p) for p in parents})

    last = parents[1]
    best = best_head_of(last)
    assert {k: best[k] for k in HEAD_FIELDS} == expected_best_head(study)
    assert best["value"] == pytest.approx(study.best_value) and best["trial"] == study.best_trial.number
    assert last.data.metrics["best_val_loss"] == pytest.approx(study.best_value)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(last.info.run_id)}
    assert {schema.ARTIFACT_BEST_HEAD, schema.ARTIFACT_HISTORY, schema.ARTIFACT_IMPORTANCES,
            schema.ARTIFACT_TRIALS, schema.ARTIFACT_SEARCH_SPACE} <= artifacts
    assert last.data.params["storage"] == storage and last.data.params["seeds"] == "1,2"

    # The tuned head, by run URI, is the head a real training run trains.
    config = resolve_train_config(**TINY, data=str(synthetic), cache_dir=str(cache), seed="1", log_model="false",
                                head_config=f"runs:/{last.info.run_id}/{schema.ARTIFACT_BEST_HEAD}")
    mlflow.set_experiment("tune-sqlite-train")
    with mlflow.start_run() as run:
        result = train_and_log(config, progress=False)
    params = mlflow.MlflowClient().get_run(run.info.run_id).data.params
    assert params["dense_units"] == ",".join(map(str, best["dense_units"]))
    assert float(params["dropout"]) == pytest.approx(best["dropout"])
    assert float(params["learning_rate"]) == pytest.approx(best["learning_rate"])
    assert int(params["batch_size"]) == best["batch_size"]
    assert result.cache.misses == 0


def test_joining_a_study_with_other_settings_names_the_difference(synthetic, tracking_uri, tmp_path):
    from ecg_mlflow.cli import main

    storage = f"sqlite:///{tmp_path}/optuna.db"
    common = ["tune", "--storage", storage, "--study-name", "mixed", "--n-trials", "1",
              "--experiment", "tune-mixed"]
    first = CliRunner().invoke(main, [*common, *tiny_args(synthetic, tmp_path / "cache")])
    assert first.exit_code == 0, first.output
    other = CliRunner().invoke(main, [*common, *tiny_args(synthetic, tmp_path / "cache", patience="3")])
    assert other.exit_code == 2
    assert "was run with patience=2, this worker has patience=3" in other.output


# --- two parallel workers on a real PostgreSQL ------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(1200)  # two workers (600 s each) against the team server
@pytest.mark.infra
def test_two_postgres_workers_make_one_study(team_server, synthetic, tmp_path):  # noqa: F811
    import mlflow
    import optuna

    from ecg_mlflow.config import parse_train_config
    from ecg_mlflow.data.splits import make_split
    from ecg_mlflow.train import load_dataset, prepare_features

    cache = tmp_path / "cache"
    # Fill the feature cache once, so that neither worker runs the backbone.
    manifest = load_dataset(str(synthetic), progress=False)
    warm = prepare_features(parse_train_config(**TINY, data=str(synthetic), cache_dir=str(cache)),
                            manifest, make_split(manifest, "paper", 1), progress=False)
    assert warm.cache.misses == 24

    from sqlalchemy.engine import URL, make_url

    storage = make_url(team_server.optuna_storage)  # the password travels in the environment
    # (URL.set(password=None) would keep the password: set() ignores None)
    without_password = URL.create(storage.drivername, username=storage.username, host=storage.host,
                                  port=storage.port, database=storage.database)
    args = [ECG_MLFLOW, "tune", *tiny_args(synthetic, cache), "--storage",
            without_password.render_as_string(hide_password=False),
            "--study-name", "two-workers", "--n-trials", "3", "--experiment", "tune-postgres"]
    env = {**team_server.client_env(), "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
           tune_config.PASSWORD_ENV: storage.password}
    workers = [subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]

    study = optuna.load_study(study_name="two-workers", storage=team_server.optuna_storage)
    assert len(study.trials) == 6  # 3 + 3: none lost, none counted twice
    assert sorted(t.number for t in study.trials) == list(range(6))
    assert all(t.state.is_finished() for t in study.trials)
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 6

    mlflow.set_tracking_uri(team_server.tracking_uri)
    try:
        runs = runs_of("tune-postgres")
        parents = [r for r in runs if r.data.tags.get(schema.TAG_ROLE) == schema.ROLE_TUNE]
        assert len(parents) == 2
        ran = {p.info.run_id: worker_trials(p) for p in parents}
        assert sorted(n for trials in ran.values() for n in trials) == list(range(6))
        assert [len(trials) for trials in ran.values()] == [3, 3]
        assert [p.data.metrics["cache_misses"] for p in parents] == [0, 0]
        check_trial_runs(runs, study, ran)
        # The worker whose optimisation ended last saw all six trials finished: its best
        # head is the study's, as the storage computes it.
        saw_all = [p for p in parents if p.data.metrics["study_finished_trials"] == 6]
        assert saw_all
        for parent in saw_all:
            best = best_head_of(parent)
            assert {k: best[k] for k in HEAD_FIELDS} == expected_best_head(study)
            assert best["trial"] == study.best_trial.number
    finally:
        mlflow.set_tracking_uri(None)
