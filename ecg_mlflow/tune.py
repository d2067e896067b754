"""Optuna search over the dense head, on cached backbone features, validation set only.

The backbone is frozen, so every trial reuses the features computed once per image; a
trial only trains heads (one per seed, each seed with its own validation draw) and is
scored by the mean over seeds of the best validation loss (the weights early stopping
restores). The test set is never looked at. Workers that share a storage and a study
name make one study: trial numbers come from the storage, and the sampler is reseeded
from the trial number, so workers never draw the same random sequence while a single
worker stays reproducible.

This module never opens MLflow runs; `ecg_mlflow.tune_tracking` wraps each trial in one.
"""

from __future__ import annotations

import functools
import math
import re
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ecg_mlflow import head as paper
from ecg_mlflow.config import ConfigError, TrainConfig, parse_int, parse_train_config
from ecg_mlflow.config import parse_seeds as config_parse_seeds
from ecg_mlflow.head import HeadConfig

# Search space. 0 second-layer units means "no second dense layer".
UNITS_1: tuple[int, ...] = (64, 128, 256, 512, 1024)
UNITS_2: tuple[int, ...] = (0, 32, 64, 128, 256, 512)
DROPOUT_RANGE = (0.0, 0.5)
LEARNING_RATE_RANGE = (1e-5, 1e-2)
BATCH_SIZES: tuple[int, ...] = (8, 16, 32, 64)

OBJECTIVE = "val_loss"
OBJECTIVE_DESCRIPTION = "mean over seeds of the best validation loss (the restored epoch)"
DIRECTION = "minimize"
PRUNER_STARTUP_TRIALS = 5
PRUNER_WARMUP_EPOCHS = 5
SAMPLER_STARTUP_TRIALS = 10
MAX_SEEDS = 20
HEARTBEAT_INTERVAL_S = 30
HEARTBEAT_GRACE_S = 120
SCHEMA_RACE_RETRIES = 5
STUDY_SIGNATURE_ATTR = "ecg_signature"
MLFLOW_RUN_ATTR = "mlflow_run_id"
STORAGE_PREFIXES = ("sqlite:///", "postgresql", "mysql")

# Artifacts of the tune run (its tags and roles are in ecg_mlflow.names).
ARTIFACT_BEST_HEAD = "best_head.json"
ARTIFACT_HISTORY = "optimization_history.png"
ARTIFACT_IMPORTANCES = "param_importances.png"
ARTIFACT_TRIALS = "trials.csv"
ARTIFACT_SEARCH_SPACE = "search_space.json"

TUNE_TRAIN_FIELDS: tuple[str, ...] = (
    "arch", "data", "weights", "image_height", "image_width", "split", "crop",
    "cache_dir", "max_epochs", "patience",
)
"""The `main` parameters `tune` takes; the head's own fields are what it searches."""


@dataclass(frozen=True)
class TuneConfig:
    """One tuning worker: data and preprocessing (as `main`), budget, seeds and storage."""

    train: TrainConfig
    n_trials: int = 30
    timeout: float | None = None
    seeds: tuple[int, ...] = (1,)
    storage: str = "sqlite:///optuna.db"
    study_name: str = ""
    sampler_seed: int = 0

    def as_params(self) -> dict[str, str]:
        """Parameters of the parent run (the storage without its password)."""
        train = self.train.as_params()
        params = {k: train[k] for k in TUNE_TRAIN_FIELDS}
        params.update({
            "n_trials": str(self.n_trials),
            "timeout": str(self.timeout or 0),
            "seeds": ",".join(map(str, self.seeds)),
            "storage": redact_storage(self.storage),
            "study_name": self.study_name,
            "sampler_seed": str(self.sampler_seed),
            "objective": OBJECTIVE,
        })
        return params


def parse_seeds(raw) -> tuple[int, ...]:
    """Seeds per trial: config.parse_seeds with the per-trial limit."""
    return config_parse_seeds(raw, max_seeds=MAX_SEEDS)


def check_storage(raw) -> str:
    """An Optuna RDB URL: sqlite:///file.db (one machine) or postgresql://... (parallel)."""
    value = str(raw).strip()
    if not value.startswith(STORAGE_PREFIXES):
        raise ConfigError(
            f"storage must be an SQLAlchemy URL such as sqlite:///optuna.db or "
            f"postgresql+psycopg2://user:pass@host/db; got {redact_storage(value)!r}"
        )
    return value


def redact_storage(url: str) -> str:
    """The storage URL with any password replaced, fit for logs and MLflow params."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def parse_tune_config(
    *, n_trials="30", timeout="0", seeds="1", storage="sqlite:///optuna.db",
    study_name="", sampler_seed="0", **train_raw,
) -> TuneConfig:
    """A TuneConfig from raw strings; a bad value fails with one line naming it."""
    unknown = set(train_raw) - set(TUNE_TRAIN_FIELDS)
    if unknown:
        raise ConfigError(f"tune does not take parameter(s): {', '.join(sorted(unknown))}")
    train = parse_train_config(**train_raw)
    trials = parse_int("n_trials", n_trials, minimum=1)
    try:
        seconds = float(str(timeout).strip())
    except ValueError:
        raise ConfigError(f"timeout must be a number of seconds (0 = none), got {timeout!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"timeout must be a non-negative number of seconds, got {timeout!r}")
    base = parse_int("sampler_seed", sampler_seed)
    name = str(study_name).strip() or f"ecg-head-{train.arch}"
    if not re.fullmatch(r"[\w.\-]{1,200}", name):
        raise ConfigError(f"study_name may hold letters, digits, '.', '-' and '_' only; got {study_name!r}")
    return TuneConfig(
        train=train, n_trials=trials, timeout=seconds or None, seeds=parse_seeds(seeds),
        storage=check_storage(storage), study_name=name, sampler_seed=base,
    )


# --- search space -------------------------------------------------------------------

def suggest_head(trial, base: HeadConfig) -> HeadConfig:
    """Sample a head: two dense layers (the second may be absent), dropout, learning
    rate (log scale) and batch size; epochs and patience stay those of `base`."""
    units_1 = trial.suggest_categorical("units_1", UNITS_1)
    units_2 = trial.suggest_categorical("units_2", UNITS_2)
    return replace(
        base,
        dense_units=(units_1, units_2) if units_2 else (units_1,),
        dropout=trial.suggest_float("dropout", *DROPOUT_RANGE),
        learning_rate=trial.suggest_float("learning_rate", *LEARNING_RATE_RANGE, log=True),
        batch_size=trial.suggest_categorical("batch_size", BATCH_SIZES),
    )


def head_from_params(params: dict, base: HeadConfig) -> HeadConfig:
    """The HeadConfig a trial's params stand for."""
    units = (int(params["units_1"]), int(params["units_2"]))
    return replace(
        base,
        dense_units=units if units[1] else units[:1],
        dropout=float(params["dropout"]),
        learning_rate=float(params["learning_rate"]),
        batch_size=int(params["batch_size"]),
    )


def params_from_head(config: HeadConfig) -> dict[str, object]:
    """Trial params of a head in the search space (for enqueuing the paper's head)."""
    units_2 = config.dense_units[1] if len(config.dense_units) > 1 else 0
    return {
        "units_1": config.dense_units[0], "units_2": units_2, "dropout": config.dropout,
        "learning_rate": config.learning_rate, "batch_size": config.batch_size,
    }


def search_space_document() -> dict[str, object]:
    """The search space as logged on the parent run."""
    return {
        "units_1": list(UNITS_1), "units_2 (0 = no second layer)": list(UNITS_2),
        "dropout": list(DROPOUT_RANGE), "learning_rate (log)": list(LEARNING_RATE_RANGE),
        "batch_size": list(BATCH_SIZES), "objective": OBJECTIVE_DESCRIPTION,
        "direction": DIRECTION,
        "pruner": f"MedianPruner(n_startup_trials={PRUNER_STARTUP_TRIALS}, n_warmup_steps={PRUNER_WARMUP_EPOCHS})",
        "sampler": f"TPESampler(n_startup_trials={SAMPLER_STARTUP_TRIALS}, constant_liar=True), "
                   "reseeded per trial from sampler_seed + trial number",
    }


# --- storage and study --------------------------------------------------------------

def open_storage(url: str):
    """An RDB storage with heartbeats: a trial whose worker died is marked FAIL (and
    retried once) by the next worker instead of staying RUNNING forever."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    url = check_storage(url)
    engine_kwargs: dict[str, object] = {"pool_pre_ping": True}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}
    for attempt in range(SCHEMA_RACE_RETRIES + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL_S,
                    grace_period=HEARTBEAT_GRACE_S,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                )
        except (IntegrityError, ProgrammingError):
            # Workers started together on an empty database race to create Optuna's
            # tables; the loser finds them half made. They exist a moment later.
            if attempt == SCHEMA_RACE_RETRIES:
                raise
            time.sleep(0.5 * (attempt + 1))
        except Exception as exc:
            raise ConfigError(
                f"storage: cannot open {redact_storage(url)!r} ({type(exc).__name__}: {exc})"
            ) from None


def make_sampler(seed: int):
    """A seeded TPESampler whose random state before trial n is a function of (seed, n).

    Trial numbers are handed out once by the storage, so parallel workers started with
    the same seed never replay one random sequence (no duplicate start-up trials), and a
    single worker reproduces its study. `constant_liar` keeps parallel workers from
    sampling next to each other's running trials.
    """
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = _trial_seeded_tpe()(seed=seed, n_startup_trials=SAMPLER_STARTUP_TRIALS, constant_liar=True)
    sampler.base_seed = seed
    return sampler


@functools.cache
def _trial_seeded_tpe():
    """The TPESampler subclass (built lazily so that `ecg-mlflow --help` skips Optuna).
    It resets TPESampler's own random states; Optuna is pinned in pyproject.toml and the
    tests check reproducibility and the absence of duplicates."""
    import optuna

    class TrialSeededTPESampler(optuna.samplers.TPESampler):
        base_seed = 0

        def before_trial(self, study, trial) -> None:
            state = (self.base_seed * 1_000_003 + trial.number) % 2**32
            self._rng.rng.seed(state)
            self._random_sampler._rng.rng.seed(state)
            super().before_trial(study, trial)

    return TrialSeededTPESampler


def make_pruner():
    """Median pruning on per-epoch validation loss after a warm-up of a few epochs."""
    import optuna

    return optuna.pruners.MedianPruner(
        n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNER_WARMUP_EPOCHS
    )


def study_signature(config: TuneConfig, data_digest: str) -> dict[str, object]:
    """What must agree for two workers' trials to be comparable."""
    from ecg_mlflow.backbones import weights_identity

    train = config.train
    return {
        "arch": train.arch, "weights": weights_identity(train.weights, train.arch),
        "image_height": train.image_height, "image_width": train.image_width,
        "split": train.split, "crop": train.crop, "max_epochs": train.max_epochs,
        "patience": train.patience, "seeds": list(config.seeds), "data_digest": data_digest,
        "objective": OBJECTIVE,
    }


def open_study(config: TuneConfig, data_digest: str, *, storage=None, pruner=None):
    """Create the study, or join it when another worker already did (load_if_exists,
    race-free: exactly one worker creates it and enqueues the paper's head as a baseline).

    Returns (study, created). Joining a study run with other data, backbone,
    preprocessing or seeds fails, naming the parameter that differs.
    """
    import optuna

    storage = storage if storage is not None else open_storage(config.storage)
    sampler = make_sampler(config.sampler_seed)
    pruner = pruner if pruner is not None else make_pruner()
    try:
        study = optuna.create_study(
            storage=storage, study_name=config.study_name, direction=DIRECTION,
            sampler=sampler, pruner=pruner,
        )
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(
            study_name=config.study_name, storage=storage, sampler=sampler, pruner=pruner
        )
        created = False
    if study.direction != optuna.study.StudyDirection.MINIMIZE:
        raise ConfigError(f"study_name: study {config.study_name!r} does not minimise {OBJECTIVE}")
    signature = study_signature(config, data_digest)
    found = study.user_attrs.get(STUDY_SIGNATURE_ATTR)
    if found is None:
        study.set_user_attr(STUDY_SIGNATURE_ATTR, signature)
    else:
        for key, value in signature.items():
            if found.get(key) != value:
                raise ConfigError(
                    f"study_name: study {config.study_name!r} in {redact_storage(config.storage)} "
                    f"was run with {key}={found.get(key)!r}, this worker has {key}={value!r}; "
                    "use the same settings or another study_name"
                )
    if created:
        study.enqueue_trial(params_from_head(config.train.head_config_obj()), skip_if_exists=True)
    return study, created


# --- scoring a trial ----------------------------------------------------------------

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
    from ecg_mlflow.splits import make_split

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


# --- results ------------------------------------------------------------------------

def best_head_document(study, base: HeadConfig) -> dict[str, object]:
    """best_head.json: the head fields `main --head-config` reads, plus provenance."""
    trial = study.best_trial
    head = head_from_params(trial.params, base)
    return {
        "dense_units": list(head.dense_units),
        "dropout": head.dropout,
        "learning_rate": head.learning_rate,
        "batch_size": head.batch_size,
        "value": trial.value,
        "objective": OBJECTIVE_DESCRIPTION,
        "trial": trial.number,
        "study": study.study_name,
        "mlflow_run_id": trial.user_attrs.get(MLFLOW_RUN_ATTR),
    }


def count_states(trials) -> dict[str, int]:
    """Trials by state name (COMPLETE, PRUNED, FAIL, RUNNING, WAITING)."""
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def plot_history(study):
    """Optimisation history (objective per trial and best so far), as a Figure."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = optuna.visualization.matplotlib.plot_optimization_history(study)
    axes.set_title(f"{study.study_name}: {OBJECTIVE} (lower is better)")
    return axes.figure


def plot_importances(study):
    """fANOVA parameter importances over the completed trials, as a Figure; None while
    fewer than two trials completed (importances are undefined)."""
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = optuna.visualization.matplotlib.plot_param_importances(study)
    return axes.figure
