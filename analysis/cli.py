"""`ecg-mlflow analyze` / `python -m analysis`: statistics over a study's finished runs."""

from __future__ import annotations

import os

import click

from ecg_mlflow.parsing import ConfigError, parse_int
from ecg_mlflow.schema import DEFAULT_EXPERIMENT
from ecg_mlflow.tracking.runs import tracked_run

DEFAULT_METRICS = "accuracy,precision_macro,recall_macro,f1_macro"


@click.command("analyze")
@click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True, help="Experiment holding the study.")
@click.option("--study", default="latest", show_default=True, help="Study parent run id, or 'latest'.")
@click.option("--metrics", default=DEFAULT_METRICS, show_default=True, help="Comma-separated; the first is primary.")
@click.option("--alpha", default="0.05", show_default=True, help="Family-wise level (Bonferroni over the metrics).")
@click.option("--n-resamples", default="2000", show_default=True, help="Bootstrap resamples over test images.")
@click.option("--bootstrap-seed", default="0", show_default=True, help="Seed of the bootstrap.")
def analyze(experiment: str, study: str, metrics: str, alpha: str, n_resamples: str, bootstrap_seed: str) -> None:
    """Paired tests of the study's two backbones; logs an analysis run (ecg.role=analysis).

    Inside `mlflow run` (MLFLOW_RUN_ID set) it logs into that run instead of a new one.
    """
    from analysis.run import parse_alpha, parse_metrics

    try:
        chosen = parse_metrics(metrics)
        level = parse_alpha(alpha)
        resamples = parse_int("--n-resamples", n_resamples, minimum=100)
        seed = parse_int("--bootstrap-seed", bootstrap_seed, minimum=0)
    except ConfigError as error:
        raise click.BadParameter(str(error)) from None
    # Inside `mlflow run` the project's run is the analysis run; otherwise a new child
    # run of the study.
    analyze_and_report(
        experiment, study, chosen, level, resamples, seed,
        into_active_run=bool(os.environ.get("MLFLOW_RUN_ID")),
    )


def analyze_and_report(
    experiment: str,
    study: str,
    metrics,
    alpha: float,
    n_resamples: int = 2000,
    bootstrap_seed: int = 0,
    *,
    into_active_run: bool = False,
):
    """Analyse a study, log the analysis run and print the table; returns the analysis.

    `into_active_run` logs into the run MLflow considers active (MLFLOW_RUN_ID);
    otherwise a new run is opened as a child of the study run.
    """
    import warnings

    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from analysis.gather import AnalysisWarning
    from analysis.report import terminal_table
    from analysis.run import analyze_study, log_analysis

    # one progress bar per downloaded predictions file would bury the table
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AnalysisWarning)
        try:
            result = analyze_study(
                experiment=experiment, study=study, metrics=metrics, alpha=alpha,
                n_resamples=n_resamples, bootstrap_seed=bootstrap_seed,
            )
        except ValueError as error:
            raise click.ClickException(str(error)) from error
    for warning in caught:
        if issubclass(warning.category, AnalysisWarning):
            click.echo(f"warning: {warning.message}", err=True)

    # Inside `mlflow run` the project's run is the analysis run; otherwise a new child run of
    # the study (nested when the study run is active in this process).
    tags = {} if into_active_run else {MLFLOW_PARENT_RUN_ID: result.study_run_id}
    with tracked_run(experiment, f"analysis-{result.study_run_id[:8]}", tags,
                     nested=mlflow.active_run() is not None) as run:
        log_analysis(result, run.info.run_id, study=study, experiment=experiment)

    from analysis.cv import CVAnalysis
    from analysis.report import cv_terminal_table

    if isinstance(result, CVAnalysis):
        click.echo(f"study {result.study_run_id}: {result.first} minus {result.second}, {result.n_repeats} x "
                   f"{result.n_folds}-fold cross-validation, {result.n_images} images each tested once per repeat, "
                   f"corrected resampled t-test, {result.confidence:.2%} intervals")
        click.echo(cv_terminal_table(result))
    else:
        click.echo(f"study {result.study_run_id}: {result.first} minus {result.second}, {result.n_pairs} seed pairs, "
                   f"{result.n_images} test images, {result.confidence:.2%} intervals")
        click.echo(terminal_table(result))
    for sentence in result.disagreements():
        click.echo(f"note: {sentence}")
    click.echo(f"winner: {result.winner} (primary metric {result.primary_metric}, significant={str(result.significant).lower()})")
    click.echo(f"analysis run: {run.info.run_id}")
    return result
