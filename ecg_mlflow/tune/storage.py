"""Where the study lives: the Optuna storage (RDB, heartbeats, the schema race of parallel
workers), the sampler reseeded per trial, the pruner, and opening or joining the study.
"""

from __future__ import annotations

import functools
import time
import warnings
from pathlib import Path

from ecg_mlflow.config import ConfigError
from ecg_mlflow.tune.config import (
    DIRECTION, OBJECTIVE, PRUNER_STARTUP_TRIALS, PRUNER_WARMUP_EPOCHS, SAMPLER_STARTUP_TRIALS, TuneConfig,
    check_storage, connection_url, redact_storage, storage_password,
)
from ecg_mlflow.tune.space import params_from_head

HEARTBEAT_INTERVAL_S = 30
HEARTBEAT_GRACE_S = 120
SCHEMA_RACE_RETRIES = 5
STUDY_SIGNATURE_ATTR = "ecg_signature"


def open_storage(url: str):
    """An RDB storage with heartbeats: a trial whose worker died is marked FAIL (and
    retried once) by the next worker instead of staying RUNNING forever."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    url = check_storage(url)
    connect = connection_url(url)
    engine_kwargs: dict[str, object] = {"pool_pre_ping": True}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}
    for attempt in range(SCHEMA_RACE_RETRIES + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    connect, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL_S,
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
                f"storage: cannot open {redact_storage(url)!r} ({type(exc).__name__}: {hide_password(str(exc))})"
            ) from None


def hide_password(text: str) -> str:
    """`text` (a driver's error) with the environment's storage password, if any, masked."""
    password = storage_password()
    return text.replace(password, "***") if password else text


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
    from ecg_mlflow.model.backbones import weights_identity

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
