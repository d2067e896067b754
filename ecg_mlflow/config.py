"""Training configuration: every `main` parameter, parsed and validated in one place.

MLflow passes entry point parameters as strings and checks no types, so each value is
parsed here and a bad one fails with one line naming the parameter.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ecg_mlflow import head
from ecg_mlflow.backbones import BACKBONES, check_image_size, BackboneError
from ecg_mlflow.model.cache_store import S3_SCHEME, CacheStoreError, split_s3_url
from ecg_mlflow.preprocess import CROPS
from ecg_mlflow.names import SPLIT_POLICIES

DEFAULT_DATA = "data/ecg-images"
PAPER_HEIGHT = 512
PAPER_WIDTH = 1024
HEAD_FIELDS = ("dense_units", "dropout", "learning_rate", "batch_size")


class ConfigError(ValueError):
    """A parameter value that cannot be used; the message names the parameter."""


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

    def head_config_obj(self) -> head.HeadConfig:
        return head.HeadConfig(
            dense_units=self.dense_units,
            dropout=self.dropout,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            max_epochs=self.max_epochs,
            patience=self.patience,
        )

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


def parse_int(name: str, raw, minimum: int = 0) -> int:
    """An integer parameter of at least `minimum`, or one ConfigError naming it."""
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(name: str, raw, low: float, high: float, *, low_open: bool = True) -> float:
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or value >= high:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{name} must lie in {bracket}{low}, {high}), got {raw!r}")
    return value


def _choice(name: str, raw, choices) -> str:
    value = str(raw).strip()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {raw!r}")
    return value


def parse_bool(name: str, raw) -> bool:
    value = str(raw).strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def parse_dense_units(raw) -> tuple[int, ...]:
    """'1024,512' -> (1024, 512); one to four positive layer widths."""
    parts = [p.strip() for p in str(raw).split(",") if p.strip()]
    try:
        units = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"dense_units must be comma-separated integers like 1024,512; got {raw!r}") from None
    if not 1 <= len(units) <= 4 or min(units) < 1:
        raise ConfigError(f"dense_units must be 1 to 4 positive integers like 1024,512; got {raw!r}")
    return units


def parse_seeds(raw, *, name: str = "seeds", max_seeds: int = 1000) -> tuple[int, ...]:
    """'1' -> (1,); '1,2,5' -> (1, 2, 5); '1-10' and mixed '1-3,7' work too. Sorted,
    distinct, non-negative; the one parser of seed lists (study, tune, analysis, k8s)."""
    seeds: list[int] = []
    for part in (p.strip() for p in str(raw).split(",")):
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise ConfigError(f"{name} must look like 1-10 or 1,2,5; got {raw!r}")
        low, high = int(match[1]), int(match[2] or match[1])
        if high < low:
            raise ConfigError(f"{name}: range {part!r} runs backwards; write {high}-{low}")
        seeds.extend(range(low, high + 1))
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{name} must be distinct; got {raw!r}")
    if len(seeds) > max_seeds:
        raise ConfigError(f"{name}: at most {max_seeds} seeds; got {len(seeds)}")
    return tuple(sorted(seeds))


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


def parse_train_config(**raw) -> TrainConfig:
    """Build a TrainConfig from raw (string or typed) values; absent keys take defaults."""
    unknown = set(raw) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    values = {k: v for k, v in raw.items() if v is not None}
    parsed = {}
    if "arch" in values:
        parsed["arch"] = _choice("arch", values["arch"], tuple(BACKBONES))
    if "seed" in values:
        parsed["seed"] = parse_int("seed", values["seed"])
    if "data" in values:
        parsed["data"] = str(values["data"])
    if "weights" in values:
        parsed["weights"] = parse_weights(values["weights"])
    for key in ("image_height", "image_width"):
        if key in values:
            parsed[key] = parse_int(key, values[key], minimum=1)
            if parsed[key] > 4096:
                raise ConfigError(f"{key} must be at most 4096, got {parsed[key]}")
    if "split" in values:
        parsed["split"] = _choice("split", values["split"], SPLIT_POLICIES)
    if "crop" in values:
        parsed["crop"] = _choice("crop", values["crop"], CROPS)
    if "learning_rate" in values:
        parsed["learning_rate"] = _float("learning_rate", values["learning_rate"], 0.0, 1.0)
    if "batch_size" in values:
        parsed["batch_size"] = parse_int("batch_size", values["batch_size"], minimum=1)
    if "max_epochs" in values:
        parsed["max_epochs"] = parse_int("max_epochs", values["max_epochs"], minimum=1)
    if "patience" in values:
        parsed["patience"] = parse_int("patience", values["patience"], minimum=0)
    if "dense_units" in values:
        parsed["dense_units"] = parse_dense_units(values["dense_units"])
    if "dropout" in values:
        parsed["dropout"] = _float("dropout", values["dropout"], 0.0, 1.0, low_open=False)
    if "cache_dir" in values:
        parsed["cache_dir"] = parse_cache_dir(values["cache_dir"])
    if "head_config" in values:  # "none" spells "no head config" where empty values cannot travel
        value = str(values["head_config"]).strip()
        parsed["head_config"] = "" if value.lower() == "none" else value
    if "log_model" in values:
        parsed["log_model"] = parse_bool("log_model", values["log_model"])
    config = TrainConfig(**parsed)
    try:
        check_image_size(config.arch, config.image_height, config.image_width)
    except BackboneError as exc:
        raise ConfigError(str(exc)) from None
    return config


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
