"""`ecg-mlflow tune` (MLproject `tune`): Optuna search over the head on cached features.

One parent run per worker (tag ecg.role=tune) and one nested run per trial that worker
ran. Run several workers with one PostgreSQL `--storage` and `--study-name` to share a
study. The search itself lives in `ecg_mlflow.tune`; this module opens the runs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import click

from ecg_mlflow import names
from ecg_mlflow.commands.options import TRAIN_OPTIONS, stop_on_sigterm
from ecg_mlflow.commands.tracking import EXPERIMENT_HELP, tracked_run
from ecg_mlflow.config import ConfigError
from ecg_mlflow.dataset import DatasetError

TAG_CREATED_STUDY = "ecg.tune.created_study"
TUNE_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("n_trials", "30", "trials this worker runs"),
    ("timeout", "0", "stop starting trials after this many seconds (0 = no limit)"),
    ("seeds", "1", "seeds per trial, objective averaged: 1 | 1,2,3 | 1-3"),
    ("storage", "sqlite:///optuna.db", "Optuna storage URL; postgresql+psycopg2://... for parallel workers"),
    ("study_name", "", "Optuna study name (default ecg-head-<arch>); workers sharing it share the study"),
    ("sampler_seed", "0", "TPE seed; trial n samples from (sampler_seed, n)"),
)


def tune_options(func: Callable) -> Callable:
    """The data and preprocessing options of `main` that tuning keeps fixed, then its own."""
    from ecg_mlflow.tune import TUNE_TRAIN_FIELDS

    chosen = [o for o in TRAIN_OPTIONS if o[0] in TUNE_TRAIN_FIELDS] + list(TUNE_OPTIONS)
    for name, default, help_text in reversed(chosen):
        flag = "--" + name.replace("_", "-")
        func = click.option(flag, name, default=default, show_default=bool(default), help=help_text)(func)
    return func


@click.command()
@click.option("--arch", default="resnet50", show_default=True, help="backbone name (see `ecg-mlflow backbones`)")
@tune_options
@click.option("--experiment", default=names.DEFAULT_EXPERIMENT, help=EXPERIMENT_HELP)
def tune(experiment: str, **raw: str) -> None:
    """Tune the head (layer widths, dropout, learning rate, batch size) with Optuna on the
    validation set; logs a parent run with a nested run per trial and best_head.json."""
    from ecg_mlflow.tune import TAG_TUNE_STUDY, open_study, parse_tune_config, redact_storage

    try:
        config = parse_tune_config(**raw)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None
    stop_on_sigterm()
    from ecg_mlflow.train import load_dataset

    try:
        # Bad data, storage or a study run with other settings fail before a run is opened.
        manifest = load_dataset(config.train.data)
        study, created = open_study(config, manifest.digest)
        tags = {names.TAG_ROLE: names.ROLE_TUNE, TAG_TUNE_STUDY: config.study_name,
                TAG_CREATED_STUDY: str(created).lower()}
        with tracked_run(experiment, f"tune-{config.study_name}", tags):
            summary = tune_and_log(config, manifest, study=study)
    except (ConfigError, DatasetError) as exc:
        raise click.BadParameter(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("interrupted: the running trial is marked FAIL in the study and its run KILLED", err=True)
        sys.exit(130)
    click.echo(summary.describe(redact_storage(config.storage)))


@dataclass(frozen=True)
class TuneSummary:
    """What one worker did and what the whole study knows now."""

    run_id: str
    study_name: str
    ran: tuple[int, ...]
    states: dict[str, int]
    study_trials: int
    best_value: float | None
    best_head: dict | None
    cache_hits: int
    cache_misses: int

    def describe(self, storage: str) -> str:
        counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(self.states.items()))
        lines = [f"tune {self.study_name}: this worker ran {len(self.ran)} trials ({counts}); "
                 f"the study in {storage} holds {self.study_trials}"]
        if self.best_head is not None:
            lines.append(
                f"best val_loss {self.best_value:.4f} (trial {self.best_head['trial']}): dense_units "
                f"{self.best_head['dense_units']}, dropout {self.best_head['dropout']:.3f}, learning_rate "
                f"{self.best_head['learning_rate']:.2e}, batch_size {self.best_head['batch_size']}"
            )
            lines.append(f"train with it: ecg-mlflow train --head-config runs:/{self.run_id}/best_head.json")
        else:
            lines.append("no trial has completed yet, so there is no best head")
        return "\n".join(lines)


def tune_and_log(config, manifest, *, study=None, progress: bool = True) -> TuneSummary:
    """Tune into the active MLflow run: features once, the study's trials as nested runs,
    then the study's best head, figures and trial table on the parent. `study` defaults
    to the one `config` names (created or joined)."""
    import mlflow

    from ecg_mlflow import tune as tuning
    from ecg_mlflow.splits import make_split
    from ecg_mlflow.train import prepare_features

    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError("tune_and_log needs an active MLflow run")
    _log_params(parent.info.run_id, {
        **config.as_params(), names.PARAM_DATA_DIGEST: manifest.digest,
        "n_images": str(len(manifest.records)),
    })
    mlflow.log_dict(tuning.search_space_document(), tuning.ARTIFACT_SEARCH_SPACE)

    prepared = prepare_features(
        config.train, manifest, make_split(manifest, config.train.split, config.seeds[0]), progress=progress
    )
    mlflow.log_metrics({"cache_hits": prepared.cache.hits, "cache_misses": prepared.cache.misses,
                        names.METRIC_TIME_FEATURES: prepared.cache.seconds})
    data = tuning.seed_data(prepared, config.seeds)

    if study is None:
        study, created = tuning.open_study(config, manifest.digest)
        mlflow.set_tag(TAG_CREATED_STUDY, str(created).lower())
    ran: list[int] = []
    study.optimize(
        tracked_objective(config, data), n_trials=config.n_trials, timeout=config.timeout,
        callbacks=[lambda _study, trial: ran.append(trial.number)], gc_after_trial=True,
    )
    return _log_results(study, config, parent.info.run_id, ran, prepared.cache)


def tracked_objective(config, data):
    """The Optuna objective: one nested MLflow run per trial, under the active run,
    ending FINISHED with state complete or pruned, or FAILED/KILLED with state failed."""
    import mlflow
    import optuna

    from ecg_mlflow import tune as tuning

    base = config.train.head_config_obj()

    def objective(trial) -> float:
        head = tuning.suggest_head(trial, base)
        last: dict[str, float] = {}

        def log_epoch(seed: int, epoch: int, logs: dict[str, float]) -> None:
            mlflow.log_metrics({f"seed{seed}/{k}": float(logs[k]) for k in names.EPOCH_METRICS if k in logs},
                               step=epoch)
            last.update(pruned_seed=seed, pruned_epoch=epoch, last_val_loss=float(logs["val_loss"]))

        run = mlflow.start_run(run_name=f"trial-{trial.number}", nested=True, tags={
            names.TAG_ROLE: tuning.ROLE_TUNE_TRIAL,
            tuning.TAG_TUNE_STUDY: config.study_name,
            tuning.TAG_TUNE_TRIAL: str(trial.number),
        })
        trial.set_user_attr(tuning.MLFLOW_RUN_ATTR, run.info.run_id)
        try:
            mlflow.log_params({
                "trial": str(trial.number), "study_name": config.study_name, "arch": config.train.arch,
                **{k: str(v) for k, v in trial.params.items()},
                "dense_units": ",".join(map(str, head.dense_units)),
                "seeds": ",".join(map(str, config.seeds)),
                "max_epochs": str(head.max_epochs), "patience": str(head.patience),
            })
            score = tuning.score_head(trial, head, data, on_epoch=log_epoch)
        except optuna.TrialPruned:
            mlflow.set_tag(tuning.TAG_TUNE_STATE, tuning.STATE_PRUNED)
            mlflow.log_metrics({"pruned": 1.0, **last})
            mlflow.end_run(status="FINISHED")
            raise
        except KeyboardInterrupt:
            mlflow.set_tag(tuning.TAG_TUNE_STATE, tuning.STATE_FAILED)
            mlflow.end_run(status="KILLED")
            raise
        except BaseException:
            mlflow.set_tag(tuning.TAG_TUNE_STATE, tuning.STATE_FAILED)
            mlflow.end_run(status="FAILED")
            raise
        metrics = {tuning.OBJECTIVE: score.value, "val_accuracy": score.mean_val_accuracy, "pruned": 0.0}
        for seed in score.val_loss:
            metrics.update({f"seed{seed}/best_val_loss": score.val_loss[seed],
                            f"seed{seed}/best_val_accuracy": score.val_accuracy[seed],
                            f"seed{seed}/best_epoch": score.best_epoch[seed],
                            f"seed{seed}/stopped_epoch": score.stopped_epoch[seed]})
        mlflow.log_metrics(metrics)
        mlflow.set_tag(tuning.TAG_TUNE_STATE, tuning.STATE_COMPLETE)
        mlflow.end_run(status="FINISHED")
        return score.value

    return objective


def _log_results(study, config, run_id: str, ran: list[int], cache) -> TuneSummary:
    import matplotlib.pyplot as plt
    import mlflow

    from ecg_mlflow import tune as tuning

    mine = [t for t in study.get_trials(deepcopy=False) if t.number in set(ran)]
    states = tuning.count_states(mine)
    everything = study.get_trials(deepcopy=False)
    study_trials = len(everything)
    finished = sum(t.state.is_finished() for t in everything)  # what best_head.json has seen
    metrics = {"worker_trials": len(ran), "study_trials": study_trials, "study_finished_trials": finished,
               **{f"worker_{s.lower()}": n for s, n in states.items()}}
    mlflow.log_dict({"study": study.study_name, "trials": sorted(ran)}, "worker_trials.json")
    mlflow.log_text(study.trials_dataframe().to_csv(index=False), tuning.ARTIFACT_TRIALS)
    best_head = best_value = None
    try:
        best_head = tuning.best_head_document(study, config.train.head_config_obj())
        best_value = float(best_head["value"])
    except ValueError:  # no completed trial in the whole study yet
        pass
    if best_head is not None:
        mlflow.log_dict(best_head, tuning.ARTIFACT_BEST_HEAD)
        metrics.update({"best_val_loss": best_value, "best_trial": best_head["trial"]})
        for figure, artifact in ((tuning.plot_history(study), tuning.ARTIFACT_HISTORY),
                                 (tuning.plot_importances(study), tuning.ARTIFACT_IMPORTANCES)):
            if figure is not None:
                mlflow.log_figure(figure, artifact)
                plt.close(figure)
    mlflow.log_metrics(metrics)
    return TuneSummary(run_id, study.study_name, tuple(sorted(ran)), states, study_trials,
                       best_value, best_head, cache.hits, cache.misses)


def _log_params(run_id: str, params: dict[str, str]) -> None:
    """Log what `mlflow run` has not already logged (it keeps the user's spelling)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    logged = MlflowClient().get_run(run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})
