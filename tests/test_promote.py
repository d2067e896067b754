"""Promotion in a real MLflow store: refusal, choice by validation, versions, aliases, idempotence."""

from __future__ import annotations

import mlflow
import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from analysis.run import analyze_study, log_analysis
from ecg_mlflow import schema
from ecg_mlflow.cli import main
from ecg_mlflow.promotion import PromotionError, plan_promotion

from conftest import PROJECT_ROOT
from serving_fixtures import Study, hand_analysis_run, isolated_store, shared_cache, shared_demo_set, train_study

pytestmark = pytest.mark.timeout(1200)  # the module fixture trains models in the first test's setup
ARCHS = ("mobilenetv3large", "vgg16")
SEEDS = (1, 2)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A real study: 2 backbones x 2 seeds of real train runs, plus a real analysis run."""
    root = tmp_path_factory.mktemp("promote-store")
    with isolated_store(root):
        built = train_study("promote", root, shared_demo_set(tmp_path_factory), shared_cache(tmp_path_factory),
                            ARCHS, SEEDS)
        result = analyze_study(experiment=built.experiment, study=built.study_run_id, n_resamples=200)
        with mlflow.start_run(experiment_id=built.experiment_id, run_name="analysis",
                              tags={"mlflow.parentRunId": built.study_run_id}) as run:
            log_analysis(result, run.info.run_id, experiment=built.experiment)
        yield built, run.info.run_id


class Made:
    """What one test adds to the module's store (runs, registered models), removed when the test
    ends, passed or failed: the next test finds the store as the `study` fixture left it (the
    real analysis still the latest, no registered model)."""

    def __init__(self, study: Study):
        self.study = study
        self.runs: list[str] = []
        self.models: set[str] = set()

    def analysis(self, winner: str, other: str, **kwargs) -> str:
        run_id = hand_analysis_run(self.study, winner, other, **kwargs)
        self.runs.append(run_id)
        return run_id

    def promote(self, *args: str, model_name: str = schema.DEFAULT_MODEL_NAME):
        self.models.add(model_name)
        return _promote(self.study, "--model-name", model_name, *args)

    def clean(self) -> None:
        client = MlflowClient()
        for name in self.models:
            if client.search_registered_models(f"name = '{name}'"):
                client.delete_registered_model(name)
        for run_id in self.runs:
            client.delete_run(run_id)


@pytest.fixture()
def made(study):
    built, _ = study
    record = Made(built)
    try:
        yield record
    finally:
        record.clean()


def _promote(study: Study, *args: str):
    return CliRunner().invoke(main, ["promote", "--experiment", study.experiment, *args])


def _best_val(study: Study, arch: str, metric: str = "accuracy") -> str:
    client = MlflowClient()
    runs = [client.get_run(study.runs[(arch, s)]) for s in SEEDS]
    key, loss = schema.split_metric("val", metric), schema.split_metric("val", "loss")
    return min(runs, key=lambda r: (-r.data.metrics[key], r.data.metrics[loss], r.info.start_time)).info.run_id


def test_real_analysis_refuses_when_not_significant_and_force_promotes(study, made):
    built, analysis_id = study
    tags = MlflowClient().get_run(analysis_id).data.tags
    # 2 seed pairs of random backbones on 24 synthetic images: never significant after Bonferroni
    assert tags[schema.significant_tag("accuracy")] == "false"
    refused = made.promote(model_name="real-analysis")  # --analysis-run latest: the real analysis
    assert refused.exit_code == 1
    assert "not promoting" in refused.output and "no significant difference in accuracy" in refused.output
    assert analysis_id in refused.output and "--force" in refused.output
    assert MlflowClient().search_registered_models("name = 'real-analysis'") == []

    forced = made.promote("--analysis-run", analysis_id, "--force", "true", model_name="real-analysis")
    assert forced.exit_code == 0, forced.output
    version = MlflowClient().get_model_version_by_alias("real-analysis", schema.CHAMPION_ALIAS)
    winner = tags[schema.winner_tag("accuracy")]
    assert version.tags["arch"] == winner and version.tags["forced"] == "true"
    assert version.tags[schema.TAG_SOURCE_RUN] == _best_val(built, winner)
    analysis_metrics = MlflowClient().get_run(analysis_id).data.metrics
    p_key = schema.stat_metric("accuracy", schema.STAT_P_BONFERRONI)
    if p_key in analysis_metrics:  # NaN p-values (identical runs) are not logged
        assert float(version.tags[p_key]) == pytest.approx(analysis_metrics[p_key], rel=1e-5)
    assert "NOT significantly better" in version.description


def test_promotions_register_tag_move_aliases_and_are_idempotent(study, made):
    built, _ = study
    client = MlflowClient()
    assert client.search_registered_models(f"name = '{schema.DEFAULT_MODEL_NAME}'") == []
    first = made.analysis("mobilenetv3large", "vgg16", significant=True, p_bonferroni=0.004)
    done = made.promote("--analysis-run", first)
    assert done.exit_code == 0, done.output
    v1 = client.get_model_version_by_alias(schema.DEFAULT_MODEL_NAME, schema.CHAMPION_ALIAS)
    assert str(v1.version) == "1"
    source = _best_val(built, "mobilenetv3large")
    source_run = client.get_run(source)
    assert v1.tags[schema.TAG_SOURCE_RUN] == source
    assert v1.tags["analysis_run_id"] == first and v1.tags["study_run_id"] == built.study_run_id
    assert v1.tags["arch"] == "mobilenetv3large" and v1.tags["significant"] == "true"
    assert float(v1.tags["accuracy_p_bonferroni"]) == pytest.approx(0.004)
    for metric in schema.SUMMARY_METRICS:
        key = schema.split_metric("test", metric)
        assert float(v1.tags[key]) == pytest.approx(source_run.data.metrics[key], rel=1e-5)
    assert "significantly better than vgg16" in v1.description and source in v1.description
    promote_run = client.get_run(v1.run_id)
    assert promote_run.data.tags[schema.TAG_ROLE] == schema.ROLE_PROMOTE
    assert promote_run.data.params["source_run_id"] == source
    assert client.get_registered_model(schema.DEFAULT_MODEL_NAME).description

    again = made.promote("--analysis-run", first)
    assert again.exit_code == 0, again.output
    assert "already version 1" in again.output and "already points at version 1" in again.output
    assert len(client.search_model_versions(f"name = '{schema.DEFAULT_MODEL_NAME}'")) == 1

    second = made.analysis("vgg16", "mobilenetv3large", significant=True, p_bonferroni=0.01)
    moved = made.promote("--analysis-run", second)
    assert moved.exit_code == 0, moved.output
    champion = client.get_model_version_by_alias(schema.DEFAULT_MODEL_NAME, schema.CHAMPION_ALIAS)
    previous = client.get_model_version_by_alias(schema.DEFAULT_MODEL_NAME, schema.PREVIOUS_CHAMPION_ALIAS)
    assert (str(champion.version), str(previous.version)) == ("2", "1")
    assert champion.tags["arch"] == "vgg16" and champion.tags[schema.TAG_SOURCE_RUN] == _best_val(built, "vgg16")

    # back to the first run: its existing version becomes champion again, still no version 3
    back = made.promote("--analysis-run", first)
    assert back.exit_code == 0, back.output
    champion = client.get_model_version_by_alias(schema.DEFAULT_MODEL_NAME, schema.CHAMPION_ALIAS)
    previous = client.get_model_version_by_alias(schema.DEFAULT_MODEL_NAME, schema.PREVIOUS_CHAMPION_ALIAS)
    assert (str(champion.version), str(previous.version)) == ("1", "2")
    assert len(client.search_model_versions(f"name = '{schema.DEFAULT_MODEL_NAME}'")) == 2


def test_source_run_is_chosen_by_validation_never_by_test(study, made):
    """Give the worst-validation seed the best test score: it must still lose."""
    built, _ = study
    client = MlflowClient()
    val, test = schema.split_metric("val", "accuracy"), schema.split_metric("test", "accuracy")
    # a third, hand-logged run of the winner in the same study: best on test, worst on validation
    with mlflow.start_run(experiment_id=built.experiment_id, run_name="mobilenetv3large-s9",
                          tags={schema.TAG_ROLE: schema.ROLE_TRAIN, schema.TAG_STUDY: built.study_run_id}) as decoy:
        mlflow.log_params({"arch": "mobilenetv3large", "seed": "9"})
        mlflow.log_metrics({val: -1.0, test: 2.0})
    made.runs.append(decoy.info.run_id)  # deleted when the test ends, whatever its outcome
    analysis = made.analysis("mobilenetv3large", "vgg16", significant=True)
    plan = plan_promotion(client, built.experiment, analysis, "accuracy", "unused-name")
    assert plan.source_run_id == _best_val(built, "mobilenetv3large") != decoy.info.run_id
    assert plan.n_candidates == len(SEEDS) + 1


@pytest.mark.parametrize("args, message", [
    (["--metric", "auc"], "metric must be one of accuracy"),
    (["--force", "maybe"], "force must be true or false"),
    (["--model-name", "a/b"], "model_name must be a plain registered model name"),
    (["--analysis-run", "0123456789abcdef"], "run '0123456789abcdef' not found"),
])
def test_bad_parameters_fail_with_one_clear_line(study, made, args, message):
    built, analysis_id = study
    extra = [] if "--analysis-run" in args else ["--analysis-run", analysis_id]
    result = _promote(built, *extra, *args)
    assert result.exit_code != 0 and message in result.output, result.output
    assert MlflowClient().search_registered_models() == []


def test_a_metric_the_analysis_did_not_analyse_is_named(study, made):
    built, _ = study
    accuracy_only = made.analysis("vgg16", "mobilenetv3large", significant=True)
    result = made.promote("--analysis-run", accuracy_only, "--metric", "f1_macro", "--force", "true")
    assert result.exit_code == 1
    assert "did not analyse 'f1_macro' (analysed: accuracy)" in result.output, result.output


def test_a_study_run_is_not_an_analysis_run_and_experiments_must_exist(study):
    built, _ = study
    with pytest.raises(PromotionError, match="is not an analysis run"):
        plan_promotion(MlflowClient(), built.experiment, built.study_run_id)
    with pytest.raises(PromotionError, match="unknown experiment 'nope'.*promote"):
        plan_promotion(MlflowClient(), "nope")


def test_mlproject_promote_passes_every_parameter_to_the_command():
    entry = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())["entry_points"]["promote"]
    assert set(entry["parameters"]) == {"experiment", "analysis_run", "metric", "model_name", "force"}
    assert all(spec["type"] == "string" for spec in entry["parameters"].values())
    assert entry["parameters"]["analysis_run"]["default"] == "latest"
    assert entry["parameters"]["model_name"]["default"] == schema.DEFAULT_MODEL_NAME
    for param in entry["parameters"]:
        assert f"--{param.replace('_', '-')} {{{param}}}" in entry["command"]
    options = {o.name for o in main.commands["promote"].params}
    assert options == set(entry["parameters"])


def test_inside_mlflow_run_the_promote_run_is_that_run(study, made, monkeypatch):
    """As under `mlflow run -e promote`: MLFLOW_RUN_ID names a run that already holds the
    entry point's parameters; promotion logs into it instead of opening another."""
    built, _ = study
    client = MlflowClient()
    analysis = made.analysis("vgg16", "mobilenetv3large", significant=True)
    project_run = client.create_run(built.experiment_id, run_name="mlflow-run-promote")
    run_id = project_run.info.run_id
    made.runs.append(run_id)
    made.models.add("inside-project")
    for key, value in {"experiment": built.experiment, "analysis_run": analysis, "metric": "accuracy",
                       "model_name": "inside-project", "force": "false"}.items():
        client.log_param(run_id, key, value)
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    result = _promote(built, "--analysis-run", analysis, "--model-name", "inside-project", "--force", "false")
    assert result.exit_code == 0, result.output
    version = client.get_model_version_by_alias("inside-project", schema.CHAMPION_ALIAS)
    assert version.run_id == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[schema.TAG_ROLE] == schema.ROLE_PROMOTE
    assert run.data.params["source_run_id"] == version.tags[schema.TAG_SOURCE_RUN]
    assert [r.info.run_id for r in client.search_runs([built.experiment_id],
            f"tags.`{schema.TAG_ROLE}` = 'promote' and params.model_name = 'inside-project'")] == [run_id]
