"""The objective: train one head per seed on cached features, score the mean best validation
loss (the restored epoch), prune on the intermediate values; `tracked_objective` wraps each
trial in a nested MLflow run.

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


EpochHook = Callable[[int, int, dict[str, float]], None]


"""on_epoch(seed, epoch, logs), called before the pruning decision of that epoch."""


def pruning_step(seed_index: int, epoch: int, max_epochs: int) -> int:
    """Optuna step of an epoch: seeds follow one another, so seed k's epochs are
    compared with other trials' epochs of the same seed."""
    return seed_index * max_epochs + epoch


def score_head(trial, config: HeadConfig, data: Sequence[SeedData], *, on_epoch: EpochHook | None = None) -> TrialScore:
    """Train one head per seed and return the mean best validation loss.

    Reports every epoch's validation loss to `trial` and raises optuna.TrialPruned from
    inside Keras' fit when the pruner says so (the exception leaves fit unchanged).
    """
    import keras
    import optuna

    val_loss, val_acc, best, stopped = {}, {}, {}, {}
    for index, seed_rows in enumerate(data):
        def report(epoch: int, logs: dict[str, float], seed=seed_rows.seed, index=index) -> None:
            if on_epoch is not None:
                on_epoch(seed, epoch, logs)
            step = pruning_step(index, epoch, config.max_epochs)
            trial.report(float(logs["val_loss"]), step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at seed {seed}, epoch {epoch} (step {step})")

        keras.backend.clear_session()  # a fresh graph per head, as optuna-examples do
        _, history = paper.train_head(
            seed_rows.x_train, seed_rows.y_train, seed_rows.x_val, seed_rows.y_val,
            config, seed_rows.seed, on_epoch_end=report,
        )
        val_loss[seed_rows.seed] = float(min(history.val_loss))
        val_acc[seed_rows.seed] = float(history.val_accuracy[history.best_epoch - 1])
        best[seed_rows.seed] = history.best_epoch
        stopped[seed_rows.seed] = history.stopped_epoch
    return TrialScore(float(np.mean(list(val_loss.values()))), val_loss, val_acc, best, stopped)


def tracked_objective(config, data):
    """The Optuna objective: one nested MLflow run per trial, under the active run,
    ending FINISHED with state complete or pruned, or FAILED/KILLED with state failed."""
    import mlflow
    import optuna


    base = config.train.head_config_obj()

    def objective(trial) -> float:
        head = suggest_head(trial, base)
        last: dict[str, float] = {}

        def log_epoch(seed: int, epoch: int, logs: dict[str, float]) -> None:
            mlflow.log_metrics({f"seed{seed}/{k}": float(logs[k]) for k in schema.EPOCH_METRICS if k in logs},
                               step=epoch)
            last.update(pruned_seed=seed, pruned_epoch=epoch, last_val_loss=float(logs["val_loss"]))

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
