"""End to end: train runs in a real MLflow store, analysed, checked against scipy recomputation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats as sps
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from analysis.gather import AnalysisWarning, PairingError, StudyNotFound
from analysis.run import analyze_study
from ecg_mlflow import schema
from ecg_mlflow.data.classes import CLASSES
from ecg_mlflow.cli import main

from conftest import PROJECT_ROOT

ARCHS = ("resnet50", "efficientnetv2s")
EXPERIMENT = "ecg-test"
N_IMAGES = 48
HIT_RATE = {"resnet50": 0.85, "efficientnetv2s": 0.65}
RESAMPLES = "300"
BASE_PARAMS = {
    "data": "/data/ecg",
    "weights": "none",
    "image_height": "64",
    "image_width": "128",
    "split": "paper",
    "crop": "none",
    "learning_rate": "0.0001",
    "batch_size": "16",
    "max_epochs": "100",
    "patience": "5",
    "dense_units": "1024,512",
    "dropout": "0.2",
    "cache_dir": "/tmp/cache",
    "head_config": "",
    "log_model": "false",
    schema.PARAM_DATA_DIGEST: "d" * 16,
    schema.PARAM_TEST_DIGEST: "t" * 16,
    schema.PARAM_N_TRAIN: "120",
    schema.PARAM_N_VAL: "30",
    schema.PARAM_N_TEST: str(N_IMAGES),
}
TRUE = np.tile(np.arange(len(CLASSES)), N_IMAGES // len(CLASSES))


def _predictions(arch: str, seed: int, salt: int = 0) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per-image predictions of one run and the test metrics they imply (via scikit-learn)."""
    rng = np.random.default_rng(1000 * seed + 7 * ARCHS.index(arch) + salt)
    probs = rng.dirichlet(np.ones(len(CLASSES)), size=N_IMAGES)
    hits = rng.random(N_IMAGES) < HIT_RATE[arch] + 0.02 * seed
    probs[hits, TRUE[hits]] += 2.0  # these images get the true class as argmax
    probs /= probs.sum(axis=1, keepdims=True)
    pred = probs.argmax(axis=1)
    frame = pd.DataFrame(
        {
            schema.COL_RELPATH: [f"{CLASSES[t]}/img{i:03d}.jpg" for i, t in enumerate(TRUE)],
            schema.COL_SHA256: [f"{i:064x}" for i in range(N_IMAGES)],
            schema.COL_TRUE: [CLASSES[t] for t in TRUE],
            schema.COL_PRED: [CLASSES[p] for p in pred],
            **{col: probs[:, j] for j, col in enumerate(schema.PROB_COLUMNS)},
        }
    )
    labels = list(range(len(CLASSES)))
    metrics = {
        schema.split_metric("test", "accuracy"): accuracy_score(TRUE, pred),
        schema.split_metric("test", "precision_macro"): precision_score(TRUE, pred, average="macro", labels=labels, zero_division=0),
        schema.split_metric("test", "recall_macro"): recall_score(TRUE, pred, average="macro", labels=labels, zero_division=0),
        schema.split_metric("test", "f1_macro"): f1_score(TRUE, pred, average="macro", labels=labels, zero_division=0),
    }
    per_class = f1_score(TRUE, pred, average=None, labels=labels, zero_division=0)
    metrics.update({schema.class_metric("test", "f1", c): float(v) for c, v in zip(CLASSES, per_class)})
    metrics.update({name: float(rng.uniform(0, 0.5)) for name in schema.TEXT_SHARE_METRICS})
    return frame, metrics


def _mcnemar_by_hand(seeds=(1, 2, 3)) -> tuple[int, int, float]:
    """(b, c, exact p) of the full study's seed ensembles (argmax of the mean probabilities),
    from the generated predictions: b = resnet50 right and efficientnetv2s wrong."""
    correct = {}
    for arch in ARCHS:
        probs = np.mean([_predictions(arch, s)[0][list(schema.PROB_COLUMNS)].to_numpy() for s in seeds], axis=0)
        correct[arch] = probs.argmax(axis=1) == TRUE
    b = int(np.sum(correct["resnet50"] & ~correct["efficientnetv2s"]))
    c = int(np.sum(~correct["resnet50"] & correct["efficientnetv2s"]))
    assert b + c > 0  # discordant images exist, so the p-value is not the trivial 1
    return b, c, float(sps.binomtest(b, b + c, 0.5).pvalue)


class StudyBuilder:
    """Writes a study parent and its train runs into the test's MLflow store, schema-true."""

    def __init__(self, tmp_path):
        from mlflow import MlflowClient

        self.client = MlflowClient()
        self.tmp = tmp_path
        found = self.client.get_experiment_by_name(EXPERIMENT)
        # an explicit artifact location: the default (./mlruns) would land in the working directory
        location = (tmp_path / "artifacts").as_uri()
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(EXPERIMENT, location)
        self.clock = 1_700_000_000_000

    def tick(self) -> int:
        self.clock += 1000
        return self.clock

    def study(self, seeds: str = "1-3") -> str:
        run = self.client.create_run(
            self.experiment_id, start_time=self.tick(), tags={schema.TAG_ROLE: schema.ROLE_STUDY}
        )
        self.client.log_param(run.info.run_id, "archs", ",".join(ARCHS))
        self.client.log_param(run.info.run_id, "seeds", seeds)
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def train(self, study_id: str, arch: str, seed: int, *, salt: int = 0, status: str = "FINISHED", **overrides) -> str:
        from mlflow.entities import Metric, Param

        frame, metrics = _predictions(arch, seed, salt)
        run = self.client.create_run(
            self.experiment_id,
            start_time=self.tick(),
            tags={schema.TAG_ROLE: schema.ROLE_TRAIN, schema.TAG_STUDY: study_id},
        )
        run_id = run.info.run_id
        params = {**BASE_PARAMS, "arch": arch, "seed": str(seed), **overrides}
        self.client.log_batch(
            run_id,
            params=[Param(k, v) for k, v in params.items()],
            metrics=[Metric(k, float(v), self.clock, 0) for k, v in metrics.items()],
        )
        folder = self.tmp / run_id
        folder.mkdir()
        frame.sample(frac=1.0, random_state=seed).to_csv(folder / schema.ARTIFACT_PREDICTIONS, index=False)
        self.client.log_artifact(run_id, str(folder / schema.ARTIFACT_PREDICTIONS))
        self.client.set_terminated(run_id, status)
        return run_id

    def full_study(self, seeds=(1, 2, 3)) -> str:
        study_id = self.study(f"{min(seeds)}-{max(seeds)}")
        for seed in seeds:
            for arch in ARCHS:
                self.train(study_id, arch, seed)
        return study_id


def _logged(client, study_id: str, metric: str) -> dict[str, list[float]]:
    """Per-arch per-seed metric values read back from the train runs (seed order)."""
    runs = client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id],
        filter_string=f"tags.`{schema.TAG_STUDY}` = '{study_id}' and tags.`{schema.TAG_ROLE}` = 'train'",
    )
    out: dict[str, list[tuple[int, float]]] = {a: [] for a in ARCHS}
    for run in runs:
        out[run.data.params["arch"]].append((int(run.data.params["seed"]), run.data.metrics[schema.split_metric("test", metric)]))
    return {a: [v for _, v in sorted(vals)] for a, vals in out.items()}


def _analysis_runs(client):
    return client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id],
        filter_string=f"tags.`{schema.TAG_ROLE}` = '{schema.ROLE_ANALYSIS}'",
    )


def test_analyze_command_logs_an_analysis_run_matching_scipy(tracking_uri, tmp_path):
    builder = StudyBuilder(tmp_path)
    study_id = builder.full_study()

    result = CliRunner().invoke(main, ["analyze", "--experiment", EXPERIMENT, "--n-resamples", RESAMPLES])
    assert result.exit_code == 0, result.output
    assert "resnet50" in result.output and "p Bonf." in result.output  # the table is printed

    client = builder.client
    (run,) = _analysis_runs(client)
    data = run.data
    assert data.tags[schema.TAG_STUDY] == study_id
    assert data.tags["mlflow.parentRunId"] == study_id
    assert data.params[schema.PARAM_ARCHS] == "resnet50,efficientnetv2s"
    assert data.params[schema.PARAM_N_PAIRS] == "3"
    assert data.params[schema.PARAM_STUDY] == "latest"
    assert data.params[schema.PARAM_STUDY_RUN_ID] == study_id
    assert data.params[schema.PARAM_ALPHA] == "0.05"
    for metric in schema.SUMMARY_METRICS:
        values = _logged(client, study_id, metric)
        x, y = np.array(values["resnet50"]), np.array(values["efficientnetv2s"])
        reference = sps.ttest_rel(x, y)
        assert data.metrics[f"{metric}_mean_diff"] == pytest.approx(np.mean(x - y), abs=1e-12)
        assert data.metrics[f"{metric}_p_ttest"] == pytest.approx(reference.pvalue, rel=1e-9)
        assert data.metrics[f"{metric}_p_bonferroni"] == pytest.approx(min(1.0, 4 * reference.pvalue), rel=1e-9)
        assert data.metrics[f"{metric}_p_wilcoxon"] == pytest.approx(sps.wilcoxon(x, y).pvalue, rel=1e-9)
        assert 0 < data.metrics[f"{metric}_p_bootstrap"] <= 1
        winner = "resnet50" if x.mean() >= y.mean() else "efficientnetv2s"
        assert data.tags[schema.winner_tag(metric)] == winner
        significant = min(1.0, 4 * reference.pvalue) < 0.05
        assert data.tags[schema.significant_tag(metric)] == str(significant).lower()
    accuracy_significant = data.tags[schema.significant_tag("accuracy")] == "true"
    assert data.tags[schema.TAG_SIGNIFICANT] == str(accuracy_significant).lower()
    assert data.tags[schema.TAG_WINNER] == (data.tags[schema.winner_tag("accuracy")] if accuracy_significant else "none")

    b, c, p_mcnemar = _mcnemar_by_hand()
    assert data.metrics["accuracy_p_mcnemar"] == pytest.approx(p_mcnemar)

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert set(schema.ANALYSIS_ARTIFACTS) <= artifacts
    folder = client.download_artifacts(run.info.run_id, "", str(tmp_path / "downloaded"))
    results = json.loads((tmp_path / "downloaded" / schema.ARTIFACT_RESULTS_JSON).read_text())
    assert results["study_run_id"] == study_id and results["n_pairs"] == 3
    assert results["mcnemar"]["b"] == b and results["mcnemar"]["c"] == c
    table = pd.read_csv(f"{folder}/{schema.ARTIFACT_RESULTS_CSV}")
    assert list(table["metric"]) == list(schema.SUMMARY_METRICS)
    assert "McNemar" in (tmp_path / "downloaded" / schema.ARTIFACT_REPORT).read_text()
    for figure in (schema.ARTIFACT_FIGURE2, schema.ARTIFACT_PER_CLASS):
        assert (tmp_path / "downloaded" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bootstrap_observed_difference_equals_the_logged_metric_difference(tracking_uri, tmp_path):
    builder = StudyBuilder(tmp_path)
    study_id = builder.full_study()
    analysis = analyze_study(experiment=EXPERIMENT, study=study_id, n_resamples=200)
    for metric in schema.SUMMARY_METRICS:
        comparison = analysis.comparison(metric)
        # the bootstrap recomputes metrics from the CSVs; the t-test reads the logged metrics
        assert comparison.bootstrap.observed_diff == pytest.approx(comparison.ttest.mean_diff, abs=1e-12)
        assert comparison.confidence == pytest.approx(0.9875)
    assert analysis.seeds == (1, 2, 3)
    assert analysis.warnings == ()
    assert len([p for p in analysis.per_class if p.metric == "f1"]) == 2 * len(CLASSES)
    # the text share of both backbones side by side: the mean over seeds of the logged metric
    shares = analysis.text_share_frame().set_index(["class", "arch"])
    assert len(shares) == 2 * (1 + len(CLASSES))
    for arch in ARCHS:
        logged = [_predictions(arch, seed)[1][schema.METRIC_TEXT_SHARE] for seed in analysis.seeds]
        assert shares.loc[("all", arch), "mean"] == pytest.approx(np.mean(logged))


def test_refuses_pairs_that_differ_and_lists_every_difference(tracking_uri, tmp_path):
    builder = StudyBuilder(tmp_path)
    study_id = builder.study()
    for seed in (1, 2, 3):
        builder.train(study_id, "resnet50", seed)
    builder.train(study_id, "efficientnetv2s", 1)
    builder.train(study_id, "efficientnetv2s", 2, learning_rate="0.001")
    builder.train(study_id, "efficientnetv2s", 3, **{schema.PARAM_TEST_DIGEST: "other"})
    with pytest.raises(PairingError) as caught:
        analyze_study(experiment=EXPERIMENT, study=study_id, n_resamples=200)
    message = str(caught.value)
    assert "seed 2: learning_rate: resnet50='0.0001' vs efficientnetv2s='0.001'" in message
    assert f"seed 3: {schema.PARAM_TEST_DIGEST}" in message
    assert "2 difference(s)" in message

    result = CliRunner().invoke(main, ["analyze", "--experiment", EXPERIMENT, "--study", study_id])
    assert result.exit_code == 1
    assert "learning_rate" in result.output and "Traceback" not in result.output


def test_pairs_spelling_one_value_two_ways_are_the_same(tracking_uri, tmp_path):
    """`mlflow run . -P learning_rate=1e-4` logs the user's spelling; it is still 0.0001."""
    builder = StudyBuilder(tmp_path)
    study_id = builder.study()
    for seed in (1, 2, 3):
        builder.train(study_id, "resnet50", seed)
        builder.train(study_id, "efficientnetv2s", seed, learning_rate="1e-4", dense_units="1024, 512")
    analysis = analyze_study(experiment=EXPERIMENT, study=study_id, n_resamples=200)
    assert analysis.n_pairs == 3


def test_doubled_seed_uses_the_latest_run_and_warns(tracking_uri, tmp_path):
    builder = StudyBuilder(tmp_path)
    study_id = builder.full_study()
    later = builder.train(study_id, "resnet50", 2, salt=99)  # a rerun of seed 2
    with pytest.warns(AnalysisWarning, match=f"seed 2 of resnet50 has 2 finished runs .* using the latest, {later}"):
        analysis = analyze_study(experiment=EXPERIMENT, study=study_id, n_resamples=200)
    assert analysis.run_ids["resnet50"][1] == later
    expected = _predictions("resnet50", 2, salt=99)[1][schema.split_metric("test", "accuracy")]
    assert analysis.comparison("accuracy").first_summary.mean == pytest.approx(
        np.mean([_predictions("resnet50", 1)[1]["test_accuracy"], expected, _predictions("resnet50", 3)[1]["test_accuracy"]])
    )


def test_seed_with_one_arch_or_unfinished_is_dropped_with_a_warning(tracking_uri, tmp_path):
    builder = StudyBuilder(tmp_path)
    study_id = builder.study("1-5")
    for seed in (1, 2, 3):
        for arch in ARCHS:
            builder.train(study_id, arch, seed)
    builder.train(study_id, "resnet50", 4)
    builder.train(study_id, "efficientnetv2s", 4, status="FAILED")
    with pytest.warns(AnalysisWarning) as record:
        analysis = analyze_study(experiment=EXPERIMENT, study=study_id, n_resamples=200)
    messages = [str(w.message) for w in record]
    assert any("seed 4 has a finished run only for resnet50 (none for efficientnetv2s); dropped" in m for m in messages)
    assert any("seed 5 of the study has no finished train run" in m for m in messages)
    assert any("1 train run(s) of the study that did not finish" in m for m in messages)
    assert analysis.seeds == (1, 2, 3)
    assert analysis.n_pairs == 3


def test_fewer_than_two_pairs_is_a_clear_error(tracking_uri, tmp_path):
    builder = StudyBuilder(tmp_path)
    study_id = builder.study("1")
    for arch in ARCHS:
        builder.train(study_id, arch, 1)
    with pytest.raises(PairingError, match=r"only 1 complete seed pair\(s\) .* needs at least 2"):
        analyze_study(experiment=EXPERIMENT, study=study_id, n_resamples=200)


def test_latest_picks_the_newest_study_and_unknown_names_fail_clearly(tracking_uri, tmp_path):
    builder = StudyBuilder(tmp_path)
    builder.full_study()
    newest = builder.full_study(seeds=(4, 5))
    assert analyze_study(experiment=EXPERIMENT, n_resamples=200).study_run_id == newest

    with pytest.raises(StudyNotFound, match="unknown experiment 'nope'; experiments in this tracking store: .*ecg-test"):
        analyze_study(experiment="nope")
    with pytest.raises(StudyNotFound, match="study run 'deadbeef' not found"):
        analyze_study(experiment=EXPERIMENT, study="deadbeef")
    train_run = builder.train(newest, "resnet50", 9)
    with pytest.raises(StudyNotFound, match=f"run {train_run} is not a study run"):
        analyze_study(experiment=EXPERIMENT, study=train_run)


def test_analyze_inside_a_project_run_logs_into_that_run(tracking_uri, tmp_path, monkeypatch):
    builder = StudyBuilder(tmp_path)
    study_id = builder.full_study()
    # what `mlflow run` does: create the run, log the entry point's params, export its id
    project_run = builder.client.create_run(builder.experiment_id).info.run_id
    builder.client.log_param(project_run, "alpha", "0.050")
    builder.client.log_param(project_run, "study", study_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", project_run)

    result = CliRunner().invoke(
        main, ["analyze", "--experiment", EXPERIMENT, "--study", study_id, "--alpha", "0.050", "--n-resamples", RESAMPLES]
    )
    assert result.exit_code == 0, result.output
    (run,) = _analysis_runs(builder.client)
    assert run.info.run_id == project_run
    assert run.data.tags[schema.TAG_STUDY] == study_id
    assert run.data.params["alpha"] == "0.050"  # kept as `mlflow run` logged it
    assert run.data.metrics["accuracy_p_mcnemar"] == pytest.approx(_mcnemar_by_hand()[2])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metrics", "accuracy,auc"], "unknown metric 'auc'; allowed: accuracy, precision_macro"),
        (["--alpha", "1.5"], "alpha must be a number strictly between 0 and 1"),
        (["--alpha", "abc"], "alpha must be a number strictly between 0 and 1"),
        (["--n-resamples", "5"], "--n-resamples must be at least 100, got 5"),
    ],
)
def test_analyze_command_rejects_bad_parameters(tracking_uri, args, message):
    result = CliRunner().invoke(main, ["analyze", *args])
    assert result.exit_code == 2
    assert message in result.output


def test_metrics_subset_changes_the_bonferroni_family(tracking_uri, tmp_path):
    builder = StudyBuilder(tmp_path)
    study_id = builder.full_study()
    analysis = analyze_study(experiment=EXPERIMENT, study=study_id, metrics="f1_macro,accuracy", n_resamples=200)
    assert analysis.metrics == ("f1_macro", "accuracy")
    assert analysis.primary_metric == "f1_macro"
    assert analysis.confidence == pytest.approx(0.975)
    f1 = analysis.comparison("f1_macro")
    assert f1.p_bonferroni == pytest.approx(min(1.0, 2 * f1.ttest.p))
    assert analysis.comparison("f1_macro").mcnemar is None
    mcnemar = analysis.comparison("accuracy").mcnemar
    b, c, p = _mcnemar_by_hand()
    assert (mcnemar.b, mcnemar.c, mcnemar.n) == (b, c, N_IMAGES)
    assert mcnemar.p == pytest.approx(p, rel=1e-12)
    # the family is the two analysed metrics: Bonferroni multiplies by 2, not 4
    assert analysis.comparison("accuracy").p_mcnemar_bonferroni == pytest.approx(min(1.0, 2 * p), rel=1e-12)


@pytest.mark.slow
@pytest.mark.timeout(900)  # `mlflow run` (600 s subprocess limit)
def test_mlflow_run_analyze_entry_point_logs_into_the_project_run(tracking_uri, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    builder = StudyBuilder(tmp_path)
    study_id = builder.full_study()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    completed = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(PROJECT_ROOT), "-e", "analyze", "--env-manager", "local",
         "--experiment-name", EXPERIMENT, "-P", f"experiment={EXPERIMENT}", "-P", f"study={study_id}",
         "-P", "metrics=accuracy,f1_macro"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    (run,) = _analysis_runs(builder.client)
    assert run.data.tags.get("mlflow.project.entryPoint") == "analyze"  # the project run, not a second one
    assert run.info.status == "FINISHED"
    assert run.data.params[schema.PARAM_METRICS] == "accuracy,f1_macro"
    assert set(run.data.metrics) >= {"accuracy_p_ttest", "f1_macro_p_bootstrap", "accuracy_p_mcnemar"}
    assert "precision_macro_p_ttest" not in run.data.metrics
