"""The objective: train one head per seed on cached features, all seeds together, score the
mean best validation loss (the restored epoch), prune on the intermediate values;
`tracked_objective` wraps each trial in a nested MLflow run.

The backbone is frozen, so every trial reuses the features computed once per image; a
trial only trains heads (one per seed, each seed with its own validation draw). The test
set is never looked at. Workers that share a storage and a study name make one study: trial
numbers come from the storage, and the sampler is reseeded from the trial number
(storage.make_sampler), so workers never draw the same random sequence while a single
worker stays reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from ecg_mlflow.model import head as paper
from ecg_mlflow import schema
from ecg_mlflow.model.head import HeadConfig
from ecg_mlflow.tracking.runs import end_run_on_error
from ecg_mlflow.tracking.server import is_unreachable
from ecg_mlflow.tune.config import OBJECTIVE
from ecg_mlflow.tune.space import suggest_head


MLFLOW_RUN_ATTR = "mlflow_run_id"


@dataclass(frozen=True)
class SeedData:
    """Training and validation features of one seed's validation draw."""

    seed: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def seed_data(prepared, seeds: Sequence[int]) -> list[SeedData]:
    """Per seed, the paper's split of `prepared` (test drawn once, validation per seed);
    only the training and validation rows are kept, so no trial can see the test set."""
    from ecg_mlflow.data.splits import make_split

    out = []
    for seed in seeds:
        split = make_split(prepared.manifest, prepared.split.policy, seed)
        data = replace(prepared, split=split)
        out.append(SeedData(seed, *data.xy("train"), *data.xy("val")))
    return out


@dataclass(frozen=True)
class TrialScore:
    """A finished trial: the objective and what each seed's head reached."""

    value: float
    val_loss: dict[int, float]
    val_accuracy: dict[int, float]
    best_epoch: dict[int, int]
    stopped_epoch: dict[int, int]

    @property
    def mean_val_accuracy(self) -> float:
        return float(np.mean(list(self.val_accuracy.values())))


EpochHook = Callable[[int, dict[int, dict[str, float]], float], None]
"""on_epoch(epoch, logs by seed, reported value), called before the pruning decision of
that epoch, with the seeds that trained it."""


def stacked_seed_rows(data: Sequence[SeedData]):
    """One feature matrix holding every seed's training then validation rows, their
    one-hot labels and each seed's row indices into it (what train_seed_heads takes)."""
    from ecg_mlflow.model.seed_heads import SeedRows

    features, labels, rows, offset = [], [], [], 0
    for seed_rows in data:
        n_train, n_val = len(seed_rows.x_train), len(seed_rows.x_val)
        features += [seed_rows.x_train, seed_rows.x_val]
        labels += [seed_rows.y_train, seed_rows.y_val]
        rows.append(SeedRows(seed_rows.seed, offset + np.arange(n_train), offset + n_train + np.arange(n_val)))
        offset += n_train + n_val
    return np.concatenate(features), np.concatenate(labels), rows


def score_head(trial, config: HeadConfig, data: Sequence[SeedData], *, on_epoch: EpochHook | None = None) -> TrialScore:
    """Train the heads of every seed together (model/seed_heads.py: each seed the head
    `train_head` gives it) and return the mean best validation loss.

    After every epoch reports, at step = epoch, the mean over seeds of the best validation
    loss so far (a seed that stopped keeps its best): it falls as training goes on and at
    the last epoch is the objective itself, so Optuna compares trials epoch by epoch on
    the quantity it minimises. Raises optuna.TrialPruned when the pruner says so, which
    stops every seed of the trial.
    """
    import keras
    import optuna

    from ecg_mlflow.model.seed_heads import train_seed_heads

    best: dict[int, float] = {}

    def report(epoch: int, logs_by_seed: dict[int, dict[str, float]]) -> None:
        for seed, logs in logs_by_seed.items():
            best[seed] = min(best.get(seed, float("inf")), float(logs["val_loss"]))
        value = float(np.mean(list(best.values())))
        if on_epoch is not None:
            on_epoch(epoch, logs_by_seed, value)
        trial.report(value, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} (mean best validation loss {value:.4f})")

    keras.backend.clear_session()  # a fresh graph per trial, as optuna-examples do
    features, labels, rows = stacked_seed_rows(data)
    trained = train_seed_heads(features, labels, rows, config, on_epoch_end=report)
    val_loss, val_acc, best_epoch, stopped = {}, {}, {}, {}
    for seed, (_, history) in trained.items():
        val_loss[seed] = float(min(history.val_loss))
        val_acc[seed] = float(history.val_accuracy[history.best_epoch - 1])
        best_epoch[seed] = history.best_epoch
        stopped[seed] = history.stopped_epoch
    return TrialScore(float(np.mean(list(val_loss.values()))), val_loss, val_acc, best_epoch, stopped)


def tracked_objective(config, data):
    """The Optuna objective: one nested MLflow run per trial, under the active run,
    ending FINISHED with state complete or pruned, or FAILED/KILLED with state failed."""
    import mlflow
    import optuna


    base = config.train.head_config_obj()

    def objective(trial) -> float:
        head = suggest_head(trial, base)
        last: dict[str, float] = {}

        def log_epoch(epoch: int, logs_by_seed: dict[int, dict[str, float]], value: float) -> None:
            mlflow.log_metrics({f"seed{seed}/{k}": float(logs[k]) for seed, logs in logs_by_seed.items()
                                for k in schema.EPOCH_METRICS if k in logs}, step=epoch)
            last.update(pruned_epoch=epoch, pruned_value=value)

        run = mlflow.start_run(run_name=f"trial-{trial.number}", nested=True, tags={
            schema.TAG_ROLE: schema.ROLE_TUNE_TRIAL,
            schema.TAG_TUNE_STUDY: config.study_name,
            schema.TAG_TUNE_TRIAL: str(trial.number),
        })
        trial.set_user_attr(MLFLOW_RUN_ATTR, run.info.run_id)
        try:
            mlflow.log_params({
                "trial": str(trial.number), "study_name": config.study_name, "arch": config.train.arch,
                **{k: str(v) for k, v in trial.params.items()},
                "dense_units": ",".join(map(str, head.dense_units)),
                "seeds": ",".join(map(str, config.seeds)),
                "max_epochs": str(head.max_epochs), "patience": str(head.patience),
            })
            score = score_head(trial, head, data, on_epoch=log_epoch)
        except optuna.TrialPruned:
            mlflow.set_tag(schema.TAG_TUNE_STATE, schema.TUNE_STATE_PRUNED)
            mlflow.log_metrics({"pruned": 1.0, **last})
            mlflow.end_run(status="FINISHED")
            raise
        except BaseException as exc:
            if not is_unreachable(exc):  # a gone server gets one quick try to end the run, no more
                mlflow.set_tag(schema.TAG_TUNE_STATE, schema.TUNE_STATE_FAILED)
            end_run_on_error(exc)
            raise
        metrics = {OBJECTIVE: score.value, "val_accuracy": score.mean_val_accuracy, "pruned": 0.0}
        for seed in score.val_loss:
            metrics.update({f"seed{seed}/best_val_loss": score.val_loss[seed],
                            f"seed{seed}/best_val_accuracy": score.val_accuracy[seed],
                            f"seed{seed}/best_epoch": score.best_epoch[seed],
                            f"seed{seed}/stopped_epoch": score.stopped_epoch[seed]})
        mlflow.log_metrics(metrics)
        mlflow.set_tag(schema.TAG_TUNE_STATE, schema.TUNE_STATE_COMPLETE)
        mlflow.end_run(status="FINISHED")
        return score.value

    return objective
