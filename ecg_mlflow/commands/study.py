"""`ecg-mlflow study` (MLproject `study`): the arch x seed grid, then its analysis."""

from __future__ import annotations

import click

from ecg_mlflow import schema
from ecg_mlflow.commands.options import parse_or_exit, reported_errors, stop_on_sigterm, train_options
from ecg_mlflow.tracking.runs import EXPERIMENT_HELP, tracked_run
from ecg_mlflow.config import ConfigError


@click.command()
@click.option("--archs", default="resnet50,efficientnetv2s", show_default=True,
              help="backbones to compare, comma-separated; differences are first minus second")
@click.option("--seeds", default="1-10", show_default=True, help="seeds: 1-10, 1,2,5 or 1-3,7 (ignored with --cv)")
@click.option("--cv", default="0", show_default=True,
              help="folds of a cross-validation: every image tested once per repeat (0: the fixed split)")
@click.option("--cv-repeats", "cv_repeats", default="1", show_default=True,
              help="repeats of the cross-validation, each with its own fold assignment")
@train_options
@click.option("--analyze", "analyze", default="true", show_default=True,
              help="run the analysis when every pair has finished (true|false)")
@click.option("--experiment", default=schema.DEFAULT_EXPERIMENT, help=EXPERIMENT_HELP)
def study(archs: str, seeds: str, cv: str, cv_repeats: str, analyze: str, experiment: str, **raw: str) -> None:
    """Train every (arch, seed) pair, or with --cv every (arch, repeat, fold) cell, as child
    runs of one study run; resumable."""
    from ecg_mlflow.config import parse_bool
    from ecg_mlflow.study import parse_archs, parse_cv, parse_cv_repeats, parse_seeds

    try:
        arch_list, seed_list = parse_archs(archs), parse_seeds(seeds)
        folds, repeats = parse_cv(cv), parse_cv_repeats(cv_repeats)
        then_analyze = parse_bool("analyze", analyze)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None
    base = parse_or_exit(arch=arch_list[0], seed="0", **raw)
    stop_on_sigterm()
    import mlflow

    from ecg_mlflow.study import run_study, study_cells
    from ecg_mlflow.train import load_dataset

    with reported_errors("unfinished runs are marked KILLED; rerun the study to resume"):
        manifest = load_dataset(base.data)
        study_cells(arch_list, seed_list, manifest, base.split, folds, repeats)  # a bad design fails here
        name = f"study-{'-vs-'.join(arch_list)}" + (f"-cv{folds}x{repeats}" if folds else "")
        with tracked_run(experiment, name, {schema.TAG_ROLE: schema.ROLE_STUDY}) as parent:
            outcome = run_study(arch_list, seed_list, base, manifest, cv=folds, cv_repeats=repeats)
            click.echo(f"study {parent.info.run_id}: trained {len(outcome.trained)}, "
                       f"reused {len(outcome.adopted)}, failed {len(outcome.failed)}")
            if outcome.failed:
                for arch, seed, error in outcome.failed:
                    click.echo(f"  {arch}-s{seed} failed: {error}", err=True)
                raise click.ClickException(
                    f"{len(outcome.failed)} run(s) failed; rerun the same study to retry only those"
                )
            if then_analyze and len(arch_list) == 2:
                # `analyze` with its defaults, as the CLI registered it (see cli.COMMAND_GROUP)
                context = click.get_current_context()
                analyze = context.find_root().command.get_command(context, "analyze")
                experiment_name = mlflow.get_experiment(parent.info.experiment_id).name
                context.invoke(analyze, experiment=experiment_name, study=parent.info.run_id)
            elif then_analyze:
                click.echo("analysis skipped: it compares exactly two backbones")
