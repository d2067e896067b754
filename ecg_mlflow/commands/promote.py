"""`ecg-mlflow promote` (MLproject `promote`): the analysis' significant winner becomes `champion`."""

from __future__ import annotations

import os
import sys

import click

from ecg_mlflow import schema
from ecg_mlflow.commands.options import BadValue
from ecg_mlflow.parsing import ConfigError


@click.command()
@click.option("--experiment", default=schema.DEFAULT_EXPERIMENT, show_default=True,
              help="experiment holding the analysis; the promote run is logged there too (inside `mlflow run`: that run)")
@click.option("--analysis-run", default="latest", show_default=True, help="analysis run id, or 'latest'")
@click.option("--metric", default="accuracy", show_default=True,
              help="metric whose Bonferroni-corrected significance decides, and whose validation value picks the seed")
@click.option("--model-name", default=schema.DEFAULT_MODEL_NAME, show_default=True, help="registered model name")
@click.option("--force", default="false", show_default=True, flag_value="true", is_flag=False,
              help="true: promote the higher mean even when the difference is not significant")
def promote(experiment: str, analysis_run: str, metric: str, model_name: str, force: str) -> None:
    """Register the winner's best-validation run as a serving model and point `champion` at it.

    Exits 1 without touching the registry when the analysis did not find the winner
    significantly better on METRIC (unless --force). Promoting the same run again creates no
    new version. After a cross-validated study it first trains the winner's final model with
    the study's configuration (once per analysis run; a rerun reuses it).
    """
    from mlflow import MlflowClient

    from ecg_mlflow.promotion import (
        PromotionError, PromotionRefused, final_command, move_champion, plan_promotion, register_version,
        train_final_model,
    )
    from ecg_mlflow.serving.packaging import log_serving_model

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = MlflowClient()
    try:
        plan = plan_promotion(client, experiment, analysis_run, metric, model_name, force)
    except PromotionRefused as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except ConfigError as exc:
        raise BadValue(str(exc)) from None
    except PromotionError as exc:
        raise click.ClickException(str(exc)) from None
    for note in plan.notes:
        click.echo(f"warning: {note}", err=True)

    import mlflow

    from ecg_mlflow.tracking.runs import tracked_run
    from ecg_mlflow.tracking.params import log_unlogged_params

    try:
        # inside `mlflow run` the run is that run and already lives in its experiment
        with tracked_run(experiment, f"promote-{plan.arch}-s{plan.seed}",
                         {schema.TAG_ROLE: schema.ROLE_PROMOTE, schema.TAG_STUDY: plan.study_run_id}) as run:
            log_unlogged_params(run.info.run_id, {
                "model_name": plan.model_name, "metric": plan.metric, "force": str(plan.forced).lower(),
                "analysis_run_id": plan.analysis_run_id})
            trained_final = plan.needs_training
            if trained_final:
                click.echo(f"training the final {plan.arch} model: the same as "
                           f"{final_command(plan.final_config, experiment)}")
                plan = train_final_model(plan)
            log_unlogged_params(run.info.run_id, {"source_run_id": plan.source_run_id})
            if plan.existing_version is not None:
                version = plan.existing_version
                outcome = "existing"
            else:
                info = log_serving_model(plan.source_run_id)
                version = register_version(client, plan, info.model_uri, run.info.run_id).version
                outcome = "registered"
            move = move_champion(client, plan.model_name, version)
            mlflow.set_tags({"ecg.promote.outcome": outcome, "ecg.promote.version": str(version),
                             "ecg.promote.model_name": plan.model_name})
    except ValueError as exc:  # e.g. the source run's model cannot be read; the run is FAILED
        raise click.ClickException(str(exc)) from None

    p = plan.p_bonferroni
    verdict = "significantly better than" if plan.significant else "NOT significantly better than (forced)"
    p_text = f"Bonferroni p = {p:.4g}" if p is not None else "no finite p-value"
    click.echo(f"{plan.arch} {verdict} {plan.other_arch} on {plan.metric} ({p_text}; analysis run {plan.analysis_run_id})")
    if plan.cv:
        click.echo(f"final model: train run {plan.source_run_id} ({plan.arch}, seed {plan.seed}, the study's "
                   f"configuration), {'trained now' if trained_final else 'trained by an earlier promotion'}")
    else:
        click.echo(f"source run {plan.source_run_id} (seed {plan.seed}): best {plan.val_metric} "
                   f"{plan.source_metrics[plan.val_metric]:.4f} of {plan.n_candidates} {plan.arch} runs")
    if outcome == "existing":
        click.echo(f"run {plan.source_run_id} is already version {version} of {plan.model_name}: no new version")
    else:
        click.echo(f"registered {plan.model_name} version {version} (promote run {run.info.run_id})")
    if move.changed:
        previous = f", {schema.PREVIOUS_CHAMPION_ALIAS} -> version {move.previous}" if move.previous else ""
        click.echo(f"alias {schema.CHAMPION_ALIAS} -> version {version}{previous}")
    else:
        click.echo(f"alias {schema.CHAMPION_ALIAS} already points at version {version}")
    click.echo(f'serve: mlflow models serve -m "models:/{plan.model_name}@{schema.CHAMPION_ALIAS}" '
               "-p 5001 --env-manager local")
