"""Training configuration: every `main` parameter, parsed and validated in one place.

MLflow passes entry point parameters as strings and checks no types, so each value is
parsed here and a bad one fails with one line naming the parameter.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from ecg_mlflow.model import head
from ecg_mlflow.model.backbones import BACKBONES, check_image_size, BackboneError
from ecg_mlflow.model.cache_store import S3_SCHEME, CacheStoreError, split_s3_url
from ecg_mlflow.model.engines import ENGINES, PRECISIONS, EngineUnavailable, check_engine_pair, require_engine
from ecg_mlflow.data.preprocess import CROPS
from ecg_mlflow.parsing import (  # noqa: F401 (ConfigError and the parsers are the config's API)
    ConfigError, parse_bool, parse_choice, parse_dense_units, parse_float, parse_int, parse_seeds,
)
from ecg_mlflow.schema import SPLIT_POLICIES

DEFAULT_DATA = "data/ecg-images"
PAPER_HEIGHT = 512
PAPER_WIDTH = 1024
MAX_SIDE = 4096
HEAD_FIELDS = ("dense_units", "dropout", "learning_rate", "batch_size")


def default_engine() -> str:
    """openvino where the Keras backend is TensorFlow (OpenVINO converts through it), else keras."""
    from ecg_mlflow.model.backend import configured_backend

    return "openvino" if configured_backend() == "tensorflow" else "keras"


DEFAULT_ENGINE = default_engine()
DEFAULT_PRECISION = "fp32"
"""The backbone pass's defaults, chosen by benchmarks/engines.py and benchmarks/engine_study.py
(docs/benchmarks.md, "Backbone engines", "Default engine on the real data"): OpenVINO fp32 is
1.5-2.6x as fast as Keras, its features agree with Keras' to about 1e-6 and a real-data study's
per-seed accuracies stay within seed noise; bf16 needs native bf16 and is opt-in."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run: the backbone, the seed, the data and the head. Paper defaults."""

    arch: str = "resnet50"
    seed: int = 1
    data: str = DEFAULT_DATA
    weights: str = "imagenet"
    image_height: int = PAPER_HEIGHT
    image_width: int = PAPER_WIDTH
    split: str = "paper"
    crop: str = "none"
    learning_rate: float = head.PAPER_LEARNING_RATE
    batch_size: int = head.PAPER_BATCH_SIZE
    max_epochs: int = head.PAPER_MAX_EPOCHS
    patience: int = head.PAPER_PATIENCE
    dense_units: tuple[int, ...] = head.PAPER_DENSE_UNITS
    dropout: float = head.PAPER_DROPOUT
    cache_dir: str = ""
    head_config: str = ""
    log_model: bool = True
    engine: str = DEFAULT_ENGINE
    precision: str = DEFAULT_PRECISION

    def head_config_obj(self) -> head.HeadConfig:
        return head.HeadConfig(
            dense_units=self.dense_units,
            dropout=self.dropout,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            max_epochs=self.max_epochs,
            patience=self.patience,
        )

    def feature_key(self):
        """The feature-cache key of this configuration's backbone pass."""
        from ecg_mlflow.model.features import FeatureKey

        return FeatureKey(self.arch, self.weights, self.image_height, self.image_width, self.crop,
                          self.engine, self.precision)

    def as_params(self) -> dict[str, str]:
        """The run's parameters as MLflow stores them (strings, one canonical spelling)."""
        params = {}
        for key, value in asdict(self).items():
            if key == "dense_units":
                value = ",".join(str(u) for u in value)
            elif isinstance(value, bool):
                value = str(value).lower()
            elif isinstance(value, float):
                value = repr(value)
            params[key] = str(value)
        return params


def parse_weights(raw) -> str:
    value = str(raw).strip()
    if value in ("imagenet", "none"):
        return value
    if not Path(value).is_file():
        raise ConfigError(
            f"weights must be imagenet, none or the path of a weights file; {value!r} is no file"
        )
    return str(Path(value).resolve())


S3_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def parse_cache_dir(raw) -> str:
    """A folder, or `s3://bucket/prefix` for a cache shared by many machines; "" = default."""
    value = str(raw).strip()
    if value.startswith(S3_SCHEME):
        try:
            bucket, _ = split_s3_url(value)
        except CacheStoreError as exc:
            raise ConfigError(str(exc)) from None
        if not S3_BUCKET_NAME.fullmatch(bucket):
            raise ConfigError(f"cache_dir: {bucket!r} is no S3 bucket name (3-63 of a-z, 0-9, '.', '-'); got {value!r}")
    elif "://" in value:
        raise ConfigError(f"cache_dir must be a folder or an s3://bucket/prefix URL; got {value!r}")
    return value


def parse_shard(raw, *, name: str = "shard") -> tuple[int, int]:
    """'1/4' -> (1, 4): shard I of N, 0 <= I < N, as `features --shard` and its Jobs take it."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(raw))
    if not match:
        raise ConfigError(f"{name} must look like I/N, e.g. 0/4; got {raw!r}")
    index, count = int(match[1]), int(match[2])
    if count < 1 or index >= count:
        raise ConfigError(f"{name} {raw!r}: I/N needs N >= 1 and 0 <= I < N (shards are numbered 0 to N-1)")
    return index, count


def parse_head_config(raw) -> str:
    """A best_head.json path or artifact URI; "none" spells "no head config" where empty
    values cannot travel (MLflow parameters)."""
    value = str(raw).strip()
    return "" if value.lower() == "none" else value


FIELD_PARSERS: dict[str, Callable[[object], object]] = {
    "arch": lambda v: parse_choice("arch", v, tuple(BACKBONES)),
    "seed": lambda v: parse_int("seed", v),
    "data": str,
    "weights": parse_weights,
    "image_height": lambda v: parse_int("image_height", v, minimum=1, maximum=MAX_SIDE),
    "image_width": lambda v: parse_int("image_width", v, minimum=1, maximum=MAX_SIDE),
    "split": lambda v: parse_choice("split", v, SPLIT_POLICIES),
    "crop": lambda v: parse_choice("crop", v, CROPS),
    "learning_rate": lambda v: parse_float("learning_rate", v, 0.0, 1.0),
    "batch_size": lambda v: parse_int("batch_size", v, minimum=1),
    "max_epochs": lambda v: parse_int("max_epochs", v, minimum=1),
    "patience": lambda v: parse_int("patience", v, minimum=0),
    "dense_units": parse_dense_units,
    "dropout": lambda v: parse_float("dropout", v, 0.0, 1.0, low_open=False),
    "cache_dir": parse_cache_dir,
    "head_config": parse_head_config,
    "log_model": lambda v: parse_bool("log_model", v),
    "engine": lambda v: parse_choice("engine", v, ENGINES),
    "precision": lambda v: parse_choice("precision", v, PRECISIONS),
}
"""Field -> parser of every TrainConfig field; each parser names its field in its error."""


def parse_train_config(**raw) -> TrainConfig:
    """Build a TrainConfig from raw (string or typed) values; absent keys take defaults.
    Parses only: resolve_train_config is what a run trains with."""
    unknown = set(raw) - set(FIELD_PARSERS)
    if unknown:
        raise ConfigError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    config = TrainConfig(**{k: FIELD_PARSERS[k](v) for k, v in raw.items() if v is not None})
    try:
        check_image_size(config.arch, config.image_height, config.image_width)
        check_engine_pair(config.engine, config.precision)
    except ValueError as exc:  # a BackboneError, or an unknown engine or precision
        raise ConfigError(str(exc)) from None
    return config


def resolve_train_config(**raw) -> TrainConfig:
    """The configuration a run trains with, settled once, before the run opens: the parsed
    values, then the head fields of `head_config` (if given), then the defaults that depend
    on the machine (the feature cache folder), checking that this host runs the engine and
    precision asked for. What is logged is this."""
    from ecg_mlflow.model.features import default_cache_dir

    config = apply_head_config(parse_train_config(**raw))
    try:
        require_engine(config.engine, config.precision)
    except EngineUnavailable as exc:
        raise ConfigError(str(exc)) from None
    if (config.engine, config.precision) == ("keras", "bf16"):
        from ecg_mlflow.model.backend import keras_bf16_missing

        missing = keras_bf16_missing()
        if missing:
            raise ConfigError(f"precision: engine=keras precision=bf16 cannot run on this host ({missing}); "
                              "use precision=fp32, or engine=openvino on a CPU with AMX or AVX-512 BF16")
    return replace(config, cache_dir=config.cache_dir or str(default_cache_dir()))


def head_config_digest(config: TrainConfig) -> str:
    """SHA-256 of the head fields a `head_config` set ("" without one): a study's identity
    holds the head that trained, not the path of the file that named it."""
    if not config.head_config:
        return ""
    blob = json.dumps({k: getattr(config, k) for k in HEAD_FIELDS}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def apply_head_config(config: TrainConfig) -> TrainConfig:
    """Replace the head fields by those of `head_config` (a best_head.json path or an
    MLflow artifact URI such as runs:/<id>/best_head.json), if one is given."""
    if not config.head_config:
        return config
    ref = config.head_config
    try:
        if Path(ref).is_file():
            text = Path(ref).read_text()
        else:
            import mlflow

            text = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref)).read_text()
        found = json.loads(text)
    except Exception as exc:
        raise ConfigError(
            f"head_config: cannot read {ref!r} as a best_head.json file or artifact URI "
            f"({type(exc).__name__}: {exc})"
        ) from None
    found = found.get("params", found)
    overrides = {k: found[k] for k in HEAD_FIELDS if k in found}
    if not overrides:
        raise ConfigError(f"head_config: {ref!r} holds none of {', '.join(HEAD_FIELDS)}")
    if isinstance(overrides.get("dense_units"), list):
        overrides["dense_units"] = ",".join(str(u) for u in overrides["dense_units"])
    checked = parse_train_config(**{k: str(v) for k, v in overrides.items()})
    return replace(config, **{k: getattr(checked, k) for k in overrides})
