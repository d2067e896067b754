"""Click options shared by `train`, `study` and `tune`: the parameters of `main`.

Every option is taken as a string and parsed by `config.parse_train_config`, which names
the parameter in its one-line error; the same parser serves MLflow's string parameters.
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import click

from ecg_mlflow.config import ConfigError, TrainConfig, resolve_train_config

_DEFAULTS = TrainConfig()

TRAIN_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("data", _DEFAULTS.data, "dataset folder of class folders"),
    ("weights", _DEFAULTS.weights, "imagenet | none (frozen seeded random backbone) | path of a weights file"),
    ("image_height", str(_DEFAULTS.image_height), "resize height in pixels"),
    ("image_width", str(_DEFAULTS.image_width), "resize width in pixels"),
    ("split", _DEFAULTS.split, "paper (file level, as published) | grouped (duplicates kept together)"),
    ("crop", _DEFAULTS.crop, "none | grid (keep the trace grid, drop printed header and footer)"),
    ("learning_rate", repr(_DEFAULTS.learning_rate), "Adam learning rate"),
    ("batch_size", str(_DEFAULTS.batch_size), "head training batch size"),
    ("max_epochs", str(_DEFAULTS.max_epochs), "upper bound on epochs"),
    ("patience", str(_DEFAULTS.patience), "early-stopping patience on validation loss"),
    ("dense_units", ",".join(map(str, _DEFAULTS.dense_units)), "widths of the dense layers, e.g. 1024,512"),
    ("dropout", repr(_DEFAULTS.dropout), "dropout after each dense layer"),
    ("cache_dir", "", "feature cache folder or s3://bucket/prefix (default: $ECG_MLFLOW_CACHE_DIR or ~/.cache/ecg-mlflow/features)"),
    ("head_config", "", "best_head.json path or artifact URI (runs:/ID/best_head.json) from `tune`"),
    ("log_model", "true", "log the whole Keras model (true|false)"),
    ("engine", _DEFAULTS.engine, "backbone pass: keras | openvino (CPU); the served model runs the same"),
    ("precision", _DEFAULTS.precision, "backbone precision: fp32 | bf16 (engine=openvino on a CPU with AMX/AVX-512 BF16, engine=keras on a GPU)"),
)


def train_options(func: Callable) -> Callable:
    """Decorate a command with every training option (as strings)."""
    for name, default, help_text in reversed(TRAIN_OPTIONS):
        flag = "--" + name.replace("_", "-")
        func = click.option(flag, name, default=default, show_default=bool(default), help=help_text)(func)
    return func


def parse_or_exit(**raw) -> TrainConfig:
    """resolve_train_config, turning a ConfigError into click's one-line usage error."""
    try:
        return resolve_train_config(**raw)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


class BadValue(click.ClickException):
    """A parameter value the user can fix: one line `Error: ...` naming it, exit status 2
    (click's usage-error status, as for every bad parameter of every command)."""

    exit_code = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM, treated like Ctrl-C so the run ends KILLED instead of staying RUNNING."""


def stop_on_sigterm() -> None:
    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


@contextmanager
def reported_errors(interrupted: str) -> Iterator[None]:
    """One clear line for what the user can fix: bad parameters or data (usage error, exit
    2), an unreachable tracking server or feature cache (exit 1), Ctrl-C/SIGTERM (`interrupted`, exit 130)."""
    from ecg_mlflow.data.manifest import DatasetError
    from ecg_mlflow.model.backbones import BackboneError
    from ecg_mlflow.model.cache_store import CacheStoreError
    from ecg_mlflow.tracking.server import TrackingServerUnavailable

    try:
        yield
    except (ConfigError, DatasetError, BackboneError) as exc:
        raise click.BadParameter(str(exc)) from None
    except (TrackingServerUnavailable, CacheStoreError) as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        click.echo(f"interrupted: {interrupted}", err=True)
        sys.exit(130)
