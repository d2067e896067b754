"""The tune configuration: which `main` parameters tune takes, its budget, seeds and storage,
parsed and validated (one line naming the parameter).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ecg_mlflow.config import ConfigError, TrainConfig, parse_int, parse_train_config
from ecg_mlflow.config import parse_seeds as config_parse_seeds

OBJECTIVE = "val_loss"
OBJECTIVE_DESCRIPTION = "mean over seeds of the best validation loss (the restored epoch)"
DIRECTION = "minimize"
"""What a trial is scored by; the study minimises it."""
PRUNER_STARTUP_TRIALS = 5
PRUNER_WARMUP_EPOCHS = 5
SAMPLER_STARTUP_TRIALS = 10
MAX_SEEDS = 20
STORAGE_PREFIXES = ("sqlite:///", "postgresql", "mysql")
PASSWORD_ENV = "ECG_MLFLOW_OPTUNA_PASSWORD"
PASSWORD_FILE_ENV = "ECG_MLFLOW_OPTUNA_PASSWORD_FILE"
"""Where the storage password comes from: never the `storage` URL, which MLflow logs as a
param (under `mlflow run`, before the command even starts) and prints in the command line."""
TUNE_TRAIN_FIELDS: tuple[str, ...] = (
    "arch", "data", "weights", "image_height", "image_width", "split", "crop",
    "cache_dir", "max_epochs", "patience", "engine", "precision",
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
    """An Optuna RDB URL without a password: sqlite:///file.db (one machine) or
    postgresql+psycopg2://user@host/db (parallel), the password from PASSWORD_ENV."""
    value = str(raw).strip()
    if not value.startswith(STORAGE_PREFIXES):
        raise ConfigError(
            f"storage must be an SQLAlchemy URL such as sqlite:///optuna.db or "
            f"postgresql+psycopg2://user@host/db; got {redact_storage(value)!r}"
        )
    if has_password(value):
        raise ConfigError(
            f"storage must not carry a password ({redact_storage(value)!r}): MLflow logs the storage "
            f"parameter in the run's params; write postgresql+psycopg2://user@host/db and set "
            f"{PASSWORD_ENV} (or {PASSWORD_FILE_ENV}, a file holding it)"
        )
    return value


def has_password(url: str) -> bool:
    """Whether SQLAlchemy would read a password in `url` (any characters, '/' and '@' too)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).password is not None
    except Exception:  # unparsable: trust the pattern user:...@ after the scheme
        return re.search(r"://[^:/@]*:.*@", url, flags=re.S) is not None


def redact_storage(url: str) -> str:
    """The storage URL with any password replaced, fit for logs: everything from the user's
    ':' to the last '@' goes, so a password holding '/' or '@' is hidden too."""
    return re.sub(r"(://[^:/@]*):.*@", r"\1:***@", url, flags=re.S)


def storage_password(environ: Mapping[str, str] | None = None) -> str | None:
    """The storage password from PASSWORD_ENV, else from the file PASSWORD_FILE_ENV names."""
    environ = os.environ if environ is None else environ
    if environ.get(PASSWORD_ENV):
        return environ[PASSWORD_ENV]
    path = environ.get(PASSWORD_FILE_ENV, "").strip()
    if not path:
        return None
    try:
        return Path(path).expanduser().read_text().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{PASSWORD_FILE_ENV}: cannot read {path!r} ({exc.strerror or exc})") from None


def connection_url(url: str, environ: Mapping[str, str] | None = None) -> str:
    """`url` with the environment's password in it: for SQLAlchemy only, never logged."""
    password = storage_password(environ)
    if password is None or url.startswith("sqlite:"):
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).set(password=password).render_as_string(hide_password=False)


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
