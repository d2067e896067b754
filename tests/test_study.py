"""The study: the grid as child runs, resumable, analysed from what MLflow tracked."""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from ecg_mlflow import schema
from ecg_mlflow.cli import main
from ecg_mlflow.config import ConfigError
from ecg_mlflow.study import parse_archs, parse_seeds
from ecg_mlflow.synth.reports import write_synthetic_dataset

from conftest import PROJECT_ROOT
from serving_fixtures import server_env


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study-demo") / "demo"
    write_synthetic_dataset(out, per_class=8, seed=1, width=442, height=314, duplicates=0.25)
    return out


def _children(parent_id: str):
    return mlflow.search_runs(
        experiment_names=[schema.DEFAULT_EXPERIMENT],
        filter_string=f"tags.`{schema.TAG_STUDY}` = '{parent_id}' and tags.`{schema.TAG_ROLE}` = 'train'",
        output_format="list",
    )


def _latest(role: str):
    runs = mlflow.search_runs(
        experiment_names=[schema.DEFAULT_EXPERIMENT],
        filter_string=f"tags.`{schema.TAG_ROLE}` = '{role}'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    return runs[0], len(runs)


def test_seed_and_arch_lists_parse_and_fail_clearly():
    assert parse_seeds("1-10") == tuple(range(1, 11))
    assert parse_seeds("1,2,5") == (1, 2, 5)
    assert parse_seeds("5,1-3") == (1, 2, 3, 5)
    for bad in ("", "a", "3-1", "1-", "-2", "1-3,3"):
        with pytest.raises(ConfigError, match="seeds"):
            parse_seeds(bad)
    assert parse_archs("efficientnetv2s,resnet50") == ("efficientnetv2s", "resnet50")
    for bad in ("", "resnet50,resnet50", "resnet50,alexnet"):
        with pytest.raises(ConfigError, match="archs"):
            parse_archs(bad)


def test_a_rerun_trains_only_what_is_missing(demo_set, tracking_uri, tmp_path):
    args = [
        "study", "--archs", "vgg16,mobilenetv3large", "--seeds", "1-2", "--data", str(demo_set),
        "--weights", "none", "--image-height", "64", "--image-width", "64", "--max-epochs", "4",
        "--cache-dir", str(tmp_path / "cache"), "--log-model", "false", "--analyze", "false",
    ]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    parent, _ = _latest(schema.ROLE_STUDY)
    children = _children(parent.info.run_id)
    assert sorted(r.info.run_name for r in children) == [
        "mobilenetv3large-s1", "mobilenetv3large-s2", "vgg16-s1", "vgg16-s2"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert "[4/4]" in first.output
    # Each backbone ran over the images once, for its first seed only.
    misses = {(r.data.params["arch"], r.data.params["seed"]): r.data.metrics["cache_misses"] for r in children}
    assert misses[("vgg16", "2")] == 0 and misses[("mobilenetv3large", "2")] == 0
    assert misses[("vgg16", "1")] > 0

    failed = next(r for r in children if r.info.run_name == "vgg16-s2")
    mlflow.MlflowClient().set_terminated(failed.info.run_id, "FAILED")
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    new_parent, n_parents = _latest(schema.ROLE_STUDY)
    assert n_parents == 2
    assert new_parent.data.metrics["runs_trained"] == 1 and new_parent.data.metrics["runs_reused"] == 3
    finished = [r for r in _children(new_parent.info.run_id) if r.info.status == "FINISHED"]
    assert sorted(r.info.run_name for r in finished) == sorted(r.info.run_name for r in children)
    old_ids = {r.info.run_id for r in children}
    trained = {(r.data.params["arch"], int(r.data.params["seed"])) for r in finished if r.info.run_id not in old_ids}
    assert trained == {("vgg16", 2)}  # exactly the failed run, nothing else
    reused = {r.info.run_id for r in finished if r.info.run_id in old_ids}
    assert reused == old_ids - {failed.info.run_id}


def test_a_seed_logs_its_own_head_whichever_head_process_trained_it(demo_set, tracking_uri, tmp_path, monkeypatch):
    """Seeds dealt into two head processes (seeds 1 and 3 in one, 2 in the other) and all
    three in one process log exactly the curves and test metrics that each seed logs in a
    study of its own, where no other seed's head can reach its run. (That a seed's head is
    what Keras' fit gives it: tests/test_seed_heads.py.)"""
    import ecg_mlflow.study

    common = ["study", "--archs", "vgg16", "--data", str(demo_set), "--weights", "none", "--image-height", "64",
              "--image-width", "64", "--max-epochs", "3", "--cache-dir", str(tmp_path / "cache"),
              "--log-model", "false", "--analyze", "false"]
    client = mlflow.MlflowClient()

    def study(seeds: str, experiment: str) -> dict[int, tuple]:
        result = CliRunner().invoke(main, [*common, "--seeds", seeds, "--experiment", experiment])
        assert result.exit_code == 0, result.output
        runs = mlflow.search_runs(experiment_names=[experiment],
                                  filter_string=f"tags.`{schema.TAG_ROLE}` = 'train'", output_format="list")
        return {int(r.data.params["seed"]): ([m.value for m in client.get_metric_history(r.info.run_id, "val_loss")],
                                             r.data.metrics["test_accuracy"], r.data.metrics["test_f1_macro"])
                for r in runs}

    together = {}
    for processes in (2, 1):
        monkeypatch.setattr(ecg_mlflow.study, "head_processes", lambda: processes)
        together[processes] = study("1-3", f"processes-{processes}")
    alone = {seed: study(str(seed), f"alone-{seed}")[seed] for seed in (1, 2, 3)}
    assert together[2] == together[1] == alone
    curves = [np.array(curve) for curve, _, _ in alone.values()]  # the seeds' own curves differ
    assert min(np.abs(a - b).max() for i, a in enumerate(curves) for b in curves[i + 1:]) > 1e-3


def test_a_changed_parameter_is_a_different_study(demo_set, tracking_uri, tmp_path):
    common = ["study", "--archs", "vgg16,mobilenetv3large", "--seeds", "1", "--data", str(demo_set),
              "--weights", "none", "--image-height", "64", "--image-width", "64", "--max-epochs", "2",
              "--cache-dir", str(tmp_path / "cache"), "--log-model", "false", "--analyze", "false"]
    assert CliRunner().invoke(main, common).exit_code == 0
    result = CliRunner().invoke(main, common + ["--dropout", "0.3"])
    assert result.exit_code == 0, result.output
    parent, _ = _latest(schema.ROLE_STUDY)
    assert parent.data.metrics["runs_trained"] == 2 and parent.data.metrics["runs_reused"] == 0


def test_bad_study_parameters_fail_before_any_run(demo_set, tracking_uri):
    for option, value, message in (("--seeds", "ten", "seeds must look like"),
                                   ("--archs", "resnet50,foo", "archs must be distinct backbones"),
                                   ("--dropout", "2", "dropout must lie in")):
        result = CliRunner().invoke(main, ["study", "--data", str(demo_set), option, value])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")


@pytest.mark.slow
@pytest.mark.timeout(1500)  # two `mlflow run` studies (minutes each; .ci/run bounds the suite at 40 min)
def test_mlflow_run_study_then_analysis_matches_an_independent_recomputation(demo_set, tracking_uri, tmp_path):
    env = server_env(tracking_uri)
    command = [
        "mlflow", "run", str(PROJECT_ROOT), "-e", "study", "--env-manager", "local",
        "--experiment-name", schema.DEFAULT_EXPERIMENT,
        "-P", f"data={demo_set}", "-P", "weights=none", "-P", "seeds=1-3",
        "-P", "image_height=128", "-P", "image_width=256", "-P", f"cache_dir={tmp_path / 'cache'}",
        "-P", "log_model=false",  # the analysis needs the metrics only; make demo logs models
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    parent, _ = _latest(schema.ROLE_STUDY)
    children = _children(parent.info.run_id)
    assert len(children) == 6 and all(r.info.status == "FINISHED" for r in children)

    analysis, _ = _latest(schema.ROLE_ANALYSIS)
    assert analysis.data.tags[schema.TAG_STUDY] == parent.info.run_id
    by_arch = {a: {int(r.data.params["seed"]): r.data.metrics for r in children if r.data.params["arch"] == a}
               for a in ("resnet50", "efficientnetv2s")}
    for metric in schema.SUMMARY_METRICS:
        first = np.array([by_arch["resnet50"][s][f"test_{metric}"] for s in (1, 2, 3)])
        second = np.array([by_arch["efficientnetv2s"][s][f"test_{metric}"] for s in (1, 2, 3)])
        logged = analysis.data.metrics
        assert logged[f"{metric}_mean_diff"] == pytest.approx((first - second).mean(), abs=1e-12)
        if np.ptp(first - second) == 0:  # identical differences: no t-test (NaN, not logged)
            assert f"{metric}_p_ttest" not in logged and f"{metric}_p_bonferroni" not in logged
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                p = float(stats.ttest_rel(first, second).pvalue)
            assert logged[f"{metric}_p_ttest"] == pytest.approx(p, rel=1e-9)
            assert logged[f"{metric}_p_bonferroni"] == pytest.approx(min(1.0, 4 * p), rel=1e-9)
        if np.all(first == second):  # nothing to rank: no evidence of a difference
            expected = 1.0
        else:  # scipy's own choice of method (exact, or all sign flips with ties or zeros)
            expected = min(1.0, float(stats.wilcoxon(first, second, zero_method="wilcox").pvalue))
        assert logged[f"{metric}_p_wilcoxon"] == pytest.approx(expected, rel=1e-9)

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun, n_parents = _latest(schema.ROLE_STUDY)
    assert n_parents == 2 and rerun.data.metrics["runs_trained"] == 0
    assert rerun.data.metrics["runs_reused"] == 6
    all_train = mlflow.search_runs(experiment_names=[schema.DEFAULT_EXPERIMENT],
                                   filter_string="tags.`ecg.role` = 'train'", output_format="list")
    assert len(all_train) == 6, "the rerun must not train anything new"
