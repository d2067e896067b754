"""Cross-validated studies: the analysis of a hand-built 5x2cv study recomputed independently,
and a tiny real CV study end to end (tagged child runs, resumed, analysed, promoted)."""

from __future__ import annotations

import json
import math

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from scipy import stats as sps
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from analysis.gather import PairingError
from analysis.run import analyze_study
from ecg_mlflow import schema
from ecg_mlflow.cli import main
from ecg_mlflow.data.classes import CLASSES
from ecg_mlflow.promotion import TAG_FINAL_OF
from ecg_mlflow.synth.reports import write_synthetic_dataset

ARCHS = ("resnet50", "efficientnetv2s")
EXPERIMENT = "ecg-cv-test"
N_IMAGES = 40
TRUE = np.tile(np.arange(len(CLASSES)), N_IMAGES // len(CLASSES))
RELPATHS = [f"{CLASSES[t]}/img{i:03d}.jpg" for i, t in enumerate(TRUE)]
HIT_RATE = {"resnet50": 0.8, "efficientnetv2s": 0.6}


def _fold_of(repeat: int, folds: int) -> np.ndarray:
    """A stratified fold assignment per repeat: class-interleaved images, shuffled per repeat."""
    rng = np.random.default_rng(100 + repeat)
    fold = np.empty(N_IMAGES, dtype=int)
    for cls in range(len(CLASSES)):
        members = np.flatnonzero(TRUE == cls)
        fold[rng.permutation(members)] = np.arange(members.size) % folds
    return fold


def _predictions(arch: str, repeat: int, fold: int) -> np.ndarray:
    """Predicted class of every image by the (arch, repeat, fold) model (used on its fold only)."""
    rng = np.random.default_rng(1000 * repeat + 10 * fold + ARCHS.index(arch))
    hit = rng.random(N_IMAGES) < HIT_RATE[arch]
    return np.where(hit, TRUE, (TRUE + rng.integers(1, len(CLASSES), N_IMAGES)) % len(CLASSES))


class CVStudyBuilder:
    """Writes a cross-validated study (parent + one train run per arch and cell) schema-true."""

    def __init__(self, tmp_path, folds: int, repeats: int):
        self.client = MlflowClient()
        self.tmp, self.folds, self.repeats = tmp_path, folds, repeats
        found = self.client.get_experiment_by_name(EXPERIMENT)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(
            EXPERIMENT, (tmp_path / "artifacts").as_uri())

    def build(self, *, skip: tuple[int, int] | None = None, overlap: bool = False) -> str:
        from mlflow.entities import Metric, Param

        parent = self.client.create_run(self.experiment_id, tags={schema.TAG_ROLE: schema.ROLE_STUDY}).info.run_id
        for key, value in {"archs": ",".join(ARCHS), "seeds": "1-10", "cv": str(self.folds),
                           "cv_repeats": str(self.repeats)}.items():
            self.client.log_param(parent, key, value)
        for repeat in range(self.repeats):
            fold_of = _fold_of(repeat, self.folds)
            for fold in range(self.folds):
                if (repeat, fold) == skip:
                    continue
                test = np.flatnonzero(fold_of == fold)
                if overlap and (repeat, fold) == (0, 1):
                    test = np.union1d(test, np.flatnonzero(fold_of == 0)[:1])  # one image tested twice
                for arch in ARCHS:
                    pred = _predictions(arch, repeat, fold)[test]
                    run = self.client.create_run(self.experiment_id, tags={
                        schema.TAG_ROLE: schema.ROLE_TRAIN, schema.TAG_STUDY: parent,
                        schema.TAG_REPEAT: str(repeat), schema.TAG_FOLD: str(fold)}).info.run_id
                    labels = list(range(len(CLASSES)))
                    metrics = {"test_accuracy": accuracy_score(TRUE[test], pred),
                               "test_f1_macro": f1_score(TRUE[test], pred, average="macro", labels=labels,
                                                         zero_division=0)}
                    params = {"arch": arch, "seed": str(repeat * self.folds + fold + 1),
                              schema.PARAM_N_TRAIN: str(N_IMAGES - test.size - 4), schema.PARAM_N_VAL: "4",
                              schema.PARAM_N_TEST: str(test.size)}
                    self.client.log_batch(run, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
                                          params=[Param(k, v) for k, v in params.items()])
                    frame = pd.DataFrame({
                        schema.COL_RELPATH: [RELPATHS[i] for i in test], schema.COL_SHA256: [f"{i:064x}" for i in test],
                        schema.COL_TRUE: [CLASSES[t] for t in TRUE[test]], schema.COL_PRED: [CLASSES[p] for p in pred],
                        **{col: (pred == j).astype(float) for j, col in enumerate(schema.PROB_COLUMNS)}})
                    folder = self.tmp / run
                    folder.mkdir()
                    frame.to_csv(folder / schema.ARTIFACT_PREDICTIONS, index=False)
                    self.client.log_artifact(run, str(folder / schema.ARTIFACT_PREDICTIONS))
                    self.client.set_terminated(run, "FINISHED")
        self.client.set_terminated(parent, "FINISHED")
        return parent


def test_5x2cv_study_analysis_matches_an_independent_recomputation(tracking_uri, tmp_path):
    builder = CVStudyBuilder(tmp_path, folds=2, repeats=5)
    study = builder.build()
    result = CliRunner().invoke(main, ["analyze", "--experiment", EXPERIMENT, "--metrics", "accuracy,f1_macro"])
    assert result.exit_code == 0, result.output
    assert "5 x 2-fold cross-validation" in result.output and "p corr. Bonf." in result.output
    client = builder.client
    (run,) = client.search_runs([builder.experiment_id], f"tags.`{schema.TAG_ROLE}` = 'analysis'")
    logged = run.data.metrics
    assert run.data.params["cv"] == "2" and run.data.params["cv_repeats"] == "5"
    assert run.data.tags[schema.TAG_STUDY] == study
    for metric, scorer in (("accuracy", accuracy_score),
                           ("f1_macro", lambda t, p: f1_score(t, p, average="macro", labels=[0, 1, 2, 3], zero_division=0))):
        diffs, ratio = [], []
        for repeat in range(5):
            fold_of = _fold_of(repeat, 2)
            for fold in range(2):
                test = np.flatnonzero(fold_of == fold)
                first, second = (scorer(TRUE[test], _predictions(a, repeat, fold)[test]) for a in ARCHS)
                diffs.append(first - second)
                ratio.append(test.size / (N_IMAGES - test.size))
        d = np.array(diffs)
        # Bouckaert & Frank: t = mean(d) / sqrt((1/10 + n_test/n_train) var(d)), df = 9
        t = d.mean() / math.sqrt((1 / 10 + np.mean(ratio)) * d.var(ddof=1))
        p = 2 * sps.t.sf(abs(t), 9)
        assert logged[f"cv_{metric}_diff_mean"] == pytest.approx(d.mean(), abs=1e-12)
        assert logged[f"cv_{metric}_t_corrected"] == pytest.approx(t, rel=1e-9)
        assert logged[f"cv_{metric}_p_corrected"] == pytest.approx(p, rel=1e-9)
        assert logged[f"cv_{metric}_p_corrected_bonferroni"] == pytest.approx(min(1.0, 2 * p), rel=1e-9)
        assert run.data.tags[schema.significant_tag(metric)] == str(min(1.0, 2 * p) < 0.05).lower()
        # Dietterich: p_1^(1) / sqrt(mean_i s_i^2), df 5
        table = d.reshape(5, 2)
        s2 = ((table - table.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
        t5 = table[0, 0] / math.sqrt(s2.mean())
        assert logged[f"cv_{metric}_t_5x2cv"] == pytest.approx(t5, rel=1e-9)
        assert logged[f"cv_{metric}_p_5x2cv"] == pytest.approx(2 * sps.t.sf(abs(t5), 5), rel=1e-9)
        # out of fold: every image predicted once per repeat by the model of its fold
        for i, arch in enumerate(ARCHS):
            pooled = []
            for repeat in range(5):
                fold_of = _fold_of(repeat, 2)
                oof = np.array([_predictions(arch, repeat, fold_of[j])[j] for j in range(N_IMAGES)])
                pooled.append(scorer(TRUE, oof))
            key = f"cv_{metric}_oof_{'first' if i == 0 else 'second'}"
            assert logged[key] == pytest.approx(np.mean(pooled), abs=1e-12)

    folder = tmp_path / "downloaded"
    client.download_artifacts(run.info.run_id, "", str(folder))
    assert set(schema.CV_ANALYSIS_ARTIFACTS) <= {p.name for p in folder.iterdir()}
    confusion = json.loads((folder / schema.ARTIFACT_OOF_CONFUSION_JSON).read_text())
    expected = sum(confusion_matrix(TRUE, [_predictions(ARCHS[0], r, _fold_of(r, 2)[j])[j] for j in range(N_IMAGES)],
                                    labels=[0, 1, 2, 3]) for r in range(5))
    assert confusion["counts"][ARCHS[0]] == expected.tolist()
    assert np.sum(confusion["counts"][ARCHS[1]]) == 5 * N_IMAGES
    report = (folder / schema.ARTIFACT_REPORT).read_text()
    assert "corrected resampled t-test" in report and "5x2cv" in report and "repeat 4, fold 1" in report


def test_cv_analysis_refuses_a_missing_fold_and_an_image_tested_twice(tracking_uri, tmp_path):
    builder = CVStudyBuilder(tmp_path, folds=2, repeats=2)
    missing = builder.build(skip=(1, 0))
    with pytest.raises(PairingError, match="lacks a finished pair of runs for fold 0 of repeat 1; rerun"):
        analyze_study(experiment=EXPERIMENT, study=missing)
    doubled = builder.build(overlap=True)
    with pytest.raises(PairingError, match="repeat 0 of resnet50: 1 image.* tested in more than one fold"):
        analyze_study(experiment=EXPERIMENT, study=doubled)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("cv-demo") / "demo"
    write_synthetic_dataset(out, per_class=6, seed=1, width=442, height=314, duplicates=0.25)
    return out


def _train_children(parent_id: str):
    return mlflow.search_runs(experiment_names=[schema.DEFAULT_EXPERIMENT], output_format="list",
                              filter_string=f"tags.`{schema.TAG_STUDY}` = '{parent_id}' and tags.`{schema.TAG_ROLE}` = 'train'")


def _latest(role: str):
    runs = mlflow.search_runs(experiment_names=[schema.DEFAULT_EXPERIMENT], output_format="list",
                              filter_string=f"tags.`{schema.TAG_ROLE}` = '{role}'", order_by=["attributes.start_time DESC"])
    return runs[0], len(runs)


def test_a_tiny_cv_study_runs_resumes_is_analysed_and_promoted(demo_set, tracking_uri, tmp_path):
    args = ["study", "--archs", "vgg16,mobilenetv3large", "--cv", "2", "--split", "grouped", "--data", str(demo_set),
            "--weights", "none", "--image-height", "64", "--image-width", "64", "--max-epochs", "2",
            "--cache-dir", str(tmp_path / "cache"), "--log-model", "false"]
    first = CliRunner().invoke(main, args + ["--analyze", "false"])
    assert first.exit_code == 0, first.output
    parent, _ = _latest(schema.ROLE_STUDY)
    assert parent.data.params["cv"] == "2" and parent.data.params["cv_repeats"] == "1"
    children = _train_children(parent.info.run_id)
    assert sorted(r.info.run_name for r in children) == [
        "mobilenetv3large-s1-r0-f0", "mobilenetv3large-s2-r0-f1", "vgg16-s1-r0-f0", "vgg16-s2-r0-f1"]
    tested: dict[str, list[str]] = {"vgg16": [], "mobilenetv3large": []}
    client = MlflowClient()
    for run in children:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert (tags[schema.TAG_REPEAT], tags[schema.TAG_FOLD]) == ("0", str(int(params["seed"]) - 1))
        assert metrics[schema.METRIC_LEAKAGE_EXACT] == 0 and metrics[schema.METRIC_LEAKAGE_NEAR] == 0
        split = pd.read_csv(client.download_artifacts(run.info.run_id, schema.ARTIFACT_SPLIT, str(tmp_path / run.info.run_id)))
        tested[params["arch"]] += list(split.loc[split["subset"] == "test", "relpath"])
    assert sorted(tested["vgg16"]) == sorted(tested["mobilenetv3large"]) == sorted(split["relpath"])  # once each

    failed = next(r for r in children if r.info.run_name == "vgg16-s2-r0-f1")
    client.set_terminated(failed.info.run_id, "FAILED")
    second = CliRunner().invoke(main, args)  # resumes, then analyses
    assert second.exit_code == 0, second.output
    rerun, n_parents = _latest(schema.ROLE_STUDY)
    assert n_parents == 2 and rerun.data.metrics["runs_trained"] == 1 and rerun.data.metrics["runs_reused"] == 3
    assert "2-fold cross-validation" in second.output
    analysis, _ = _latest(schema.ROLE_ANALYSIS)
    assert analysis.data.tags[schema.TAG_STUDY] == rerun.info.run_id
    for metric in schema.SUMMARY_METRICS:
        assert {f"cv_{metric}_diff_mean", f"cv_{metric}_p_corrected"} <= set(analysis.data.metrics)

    # a random frozen backbone on 24 images: nothing is significant, so promote refuses ...
    refused = CliRunner().invoke(main, ["promote", "--analysis-run", analysis.info.run_id, "--model-name", "cv-model"])
    assert refused.exit_code == 1 and "not promoting" in refused.output, refused.output
    # ... and, forced, trains the winner's final model with the study's configuration, once
    forced = CliRunner().invoke(main, ["promote", "--analysis-run", analysis.info.run_id, "--model-name", "cv-model",
                                       "--force", "true"])
    assert forced.exit_code == 0, forced.output
    assert "training the final" in forced.output and "ecg-mlflow train --arch" in forced.output
    version = client.get_model_version_by_alias("cv-model", schema.CHAMPION_ALIAS)
    final = client.get_run(version.tags[schema.TAG_SOURCE_RUN])
    assert final.data.tags[TAG_FINAL_OF] == analysis.info.run_id
    assert final.data.params["seed"] == "1" and final.data.params["split"] == "grouped"
    assert final.data.params["arch"] == analysis.data.tags[schema.winner_tag("accuracy")]
    assert final.data.metrics[schema.METRIC_LEAKAGE_EXACT] == 0
    assert "cross-validation" in version.description
    again = CliRunner().invoke(main, ["promote", "--analysis-run", analysis.info.run_id, "--model-name", "cv-model",
                                      "--force", "true"])
    assert again.exit_code == 0 and "already version 1" in again.output, again.output
    assert "training the final" not in again.output
    finals = client.search_runs([final.info.experiment_id], f"tags.`{TAG_FINAL_OF}` = '{analysis.info.run_id}'")
    assert len(finals) == 1


def test_bad_cv_parameters_fail_with_one_line_before_any_run(demo_set, tracking_uri):
    for option, value, message in (("--cv", "1", "cv must be 0 (the fixed split) or at least 2 folds"),
                                   ("--cv", "x", "cv must be an integer from 0 to 100"),
                                   ("--cv-repeats", "0", "cv_repeats must be an integer from 1 to 100"),
                                   ("--cv", "9", "cv=9 folds need at least 9 distinct images")):
        extra = ["--cv", "2"] if option == "--cv-repeats" else []
        result = CliRunner().invoke(main, ["study", "--data", str(demo_set), "--split", "grouped", *extra, option, value])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")


def test_the_study_key_holds_the_design_and_a_fixed_split_keeps_its_old_key():
    import hashlib

    from ecg_mlflow.config import TrainConfig, head_config_digest
    from ecg_mlflow.study import study_key

    # Keras fp32: what every study computed with before engines existed, so the key of before
    # CV and engines, whose params had no engine or precision
    config = TrainConfig(engine="keras", precision="fp32")
    params = {k: v for k, v in config.as_params().items()
              if k not in schema.STUDY_KEY_EXEMPT_PARAMS and k not in ("engine", "precision")}
    params["head_config"] = head_config_digest(config)
    blob = json.dumps({"archs": list(ARCHS), "params": params, "data": "d"}, sort_keys=True)
    assert study_key(ARCHS, config, "d") == hashlib.sha256(blob.encode()).hexdigest()[:24]  # as before CV
    keys = {study_key(ARCHS, config, "d", cv, repeats) for cv, repeats in ((0, 1), (5, 1), (5, 2), (2, 5))}
    assert len(keys) == 4
