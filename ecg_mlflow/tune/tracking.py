"""The MLflow side of tuning: one parent run per worker, a nested run per trial.

`tune_and_log` computes the features once, runs the study with the tracked objective
(objective.py: a nested run per trial) and logs the study's best head, figures and trial
table on the parent.
"""

from __future__ import annotations

from dataclasses import dataclass

from ecg_mlflow import schema
from ecg_mlflow.tune import objective as tune_objective
from ecg_mlflow.tune import results as tune_results
from ecg_mlflow.tune import space as tune_space
from ecg_mlflow.tune import storage as tune_storage


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

    from ecg_mlflow.data.splits import make_split
    from ecg_mlflow.tracking.params import log_unlogged_params
    from ecg_mlflow.train import prepare_features

    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError("tune_and_log needs an active MLflow run")
    log_unlogged_params(parent.info.run_id, {
        **config.as_params(), schema.PARAM_DATA_DIGEST: manifest.digest,
        "n_images": str(len(manifest.records)),
    })
    mlflow.log_dict(tune_space.search_space_document(), schema.ARTIFACT_SEARCH_SPACE)

    prepared = prepare_features(
        config.train, manifest, make_split(manifest, config.train.split, config.seeds[0]), progress=progress
    )
    mlflow.log_metrics({schema.METRIC_CACHE_HITS: prepared.cache.hits, schema.METRIC_CACHE_MISSES: prepared.cache.misses,
                        schema.METRIC_TIME_FEATURES: prepared.cache.seconds})
    data = tune_objective.seed_data(prepared, config.seeds)

    if study is None:
        study, created = tune_storage.open_study(config, manifest.digest)
        mlflow.set_tag(schema.TAG_TUNE_CREATED_STUDY, str(created).lower())
    ran: list[int] = []
    study.optimize(
        tune_objective.tracked_objective(config, data), n_trials=config.n_trials, timeout=config.timeout,
        callbacks=[lambda _study, trial: ran.append(trial.number)], gc_after_trial=True,
    )
    return log_results(study, config, parent.info.run_id, ran, prepared.cache)


def log_results(study, config, run_id: str, ran: list[int], cache) -> TuneSummary:
    """Log what this worker ran and what the whole study knows now (best head, figures,
    trial table) on the tune run."""
    import matplotlib.pyplot as plt
    import mlflow

    everything = study.get_trials(deepcopy=False)  # one snapshot of the shared storage
    ran_here = set(ran)
    states = tune_results.count_states([t for t in everything if t.number in ran_here])
    study_trials = len(everything)
    finished = sum(t.state.is_finished() for t in everything)  # what best_head.json has seen
    metrics = {"worker_trials": len(ran), "study_trials": study_trials, "study_finished_trials": finished,
               **{f"worker_{s.lower()}": n for s, n in states.items()}}
    mlflow.log_dict({"study": study.study_name, "trials": sorted(ran)}, "worker_trials.json")
    mlflow.log_text(study.trials_dataframe().to_csv(index=False), schema.ARTIFACT_TRIALS)
    best_head = best_value = None
    try:
        best_head = tune_results.best_head_document(study, config.train.head_config_obj())
        best_value = float(best_head["value"])
    except ValueError:  # no completed trial in the whole study yet
        pass
    if best_head is not None:
        mlflow.log_dict(best_head, schema.ARTIFACT_BEST_HEAD)
        metrics.update({"best_val_loss": best_value, "best_trial": best_head["trial"]})
        for figure, artifact in ((tune_results.plot_history(study), schema.ARTIFACT_HISTORY),
                                 (tune_results.plot_importances(study), schema.ARTIFACT_IMPORTANCES)):
            if figure is not None:
                mlflow.log_figure(figure, artifact)
                plt.close(figure)
    mlflow.log_metrics(metrics)
    return TuneSummary(run_id, study.study_name, tuple(sorted(ran)), states, study_trials,
                       best_value, best_head, cache.hits, cache.misses)

