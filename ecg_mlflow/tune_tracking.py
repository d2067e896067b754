"""The MLflow side of tuning: one parent run per worker, a nested run per trial.

`ecg_mlflow.tune` holds the search and never opens a run; this module wraps each trial
in a nested run (params, per-epoch curves, state complete, pruned or failed) and logs the
study's best head, figures and trial table on the parent.
"""

from __future__ import annotations

from dataclasses import dataclass

from ecg_mlflow import names


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
    from ecg_mlflow.train import log_unlogged_params, prepare_features

    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError("tune_and_log needs an active MLflow run")
    log_unlogged_params(parent.info.run_id, {
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
        mlflow.set_tag(names.TAG_TUNE_CREATED_STUDY, str(created).lower())
    ran: list[int] = []
    study.optimize(
        tracked_objective(config, data), n_trials=config.n_trials, timeout=config.timeout,
        callbacks=[lambda _study, trial: ran.append(trial.number)], gc_after_trial=True,
    )
    return log_results(study, config, parent.info.run_id, ran, prepared.cache)


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
            names.TAG_ROLE: names.ROLE_TUNE_TRIAL,
            names.TAG_TUNE_STUDY: config.study_name,
            names.TAG_TUNE_TRIAL: str(trial.number),
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
            mlflow.set_tag(names.TAG_TUNE_STATE, names.TUNE_STATE_PRUNED)
            mlflow.log_metrics({"pruned": 1.0, **last})
            mlflow.end_run(status="FINISHED")
            raise
        except KeyboardInterrupt:
            mlflow.set_tag(names.TAG_TUNE_STATE, names.TUNE_STATE_FAILED)
            mlflow.end_run(status="KILLED")
            raise
        except BaseException:
            mlflow.set_tag(names.TAG_TUNE_STATE, names.TUNE_STATE_FAILED)
            mlflow.end_run(status="FAILED")
            raise
        metrics = {tuning.OBJECTIVE: score.value, "val_accuracy": score.mean_val_accuracy, "pruned": 0.0}
        for seed in score.val_loss:
            metrics.update({f"seed{seed}/best_val_loss": score.val_loss[seed],
                            f"seed{seed}/best_val_accuracy": score.val_accuracy[seed],
                            f"seed{seed}/best_epoch": score.best_epoch[seed],
                            f"seed{seed}/stopped_epoch": score.stopped_epoch[seed]})
        mlflow.log_metrics(metrics)
        mlflow.set_tag(names.TAG_TUNE_STATE, names.TUNE_STATE_COMPLETE)
        mlflow.end_run(status="FINISHED")
        return score.value

    return objective


def log_results(study, config, run_id: str, ran: list[int], cache) -> TuneSummary:
    """Log what this worker ran and what the whole study knows now (best head, figures,
    trial table) on the tune run."""
    import matplotlib.pyplot as plt
    import mlflow

    from ecg_mlflow import tune as tuning

    everything = study.get_trials(deepcopy=False)  # one snapshot of the shared storage
    ran_here = set(ran)
    states = tuning.count_states([t for t in everything if t.number in ran_here])
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

