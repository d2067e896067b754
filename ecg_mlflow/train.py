"""One training run: features from the cache, the paper's head, everything logged.

`train_and_log` logs into the active MLflow run (the caller opens it: the `train`
command, `mlflow run`, or the study driver for its child runs), so the same function
serves every entry point.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecg_mlflow import schema
from ecg_mlflow.config import HEAD_FIELDS, ConfigError, TrainConfig
from ecg_mlflow.data.manifest import ImageRecord, Manifest, build_manifest
from ecg_mlflow.model.features import CacheStats, FeatureKey, default_cache_dir, extract_features
from ecg_mlflow.data.splits import Leakage, Split, make_split, measure_leakage
from ecg_mlflow.tracking.params import log_unlogged_params

EQUALITY_SAMPLES = 4


@dataclass(frozen=True)
class TrainResult:
    """What one run produced, for the study driver and the tests."""

    run_id: str
    metrics: dict[str, float]
    split: Split
    leakage: Leakage
    cache: CacheStats
    model_max_abs_diff: float | None


def run_name(config: TrainConfig) -> str:
    """Readable run name shown in the MLflow UI: `resnet50-s3`."""
    return f"{config.arch}-s{config.seed}"


def load_dataset(data: str, *, progress: bool = True) -> Manifest:
    """The manifest of `data`; a missing folder says how to get the real or a demo set."""
    if not Path(data).is_dir():
        raise ConfigError(
            f"data: dataset folder {data!r} does not exist. Get the real data with "
            f"`ecg-mlflow data download {data}` (Mendeley Data gwbz3fsgp8 v2), or make a demo "
            f"set with `ecg-mlflow synth --out {data}`"
        )
    return build_manifest(data, progress=progress)


def train_and_log(
    config: TrainConfig, *, manifest: Manifest | None = None, progress: bool = True
) -> TrainResult:
    """Train one head on cached features and log the run schema into the active run.
    `config` is what config.resolve_train_config settled: it is logged as it is."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("train_and_log needs an active MLflow run")
    if config.head_config:
        mlflow.log_dict({k: getattr(config, k) for k in HEAD_FIELDS}, schema.ARTIFACT_HEAD)
    manifest = manifest if manifest is not None else load_dataset(config.data, progress=progress)
    split = make_split(manifest, config.split, config.seed)
    leakage = measure_leakage(manifest, split)
    _log_params(run.info.run_id, config, manifest, split)
    mlflow.set_tags({schema.TAG_ROLE: schema.ROLE_TRAIN, **backend_tags()})
    _log_dataset(manifest, config.data)

    data = prepare_features(config, manifest, split, progress=progress)
    cache = data.cache

    from ecg_mlflow.model.head import train_head

    start = time.perf_counter()
    head, history = train_head(
        *data.xy("train"), *data.xy("val"), config.head_config_obj(), config.seed,
        on_epoch_end=lambda epoch, logs: mlflow.log_metrics(
            {k: float(logs[k]) for k in schema.EPOCH_METRICS if k in logs}, step=epoch
        ),
    )
    time_head = time.perf_counter() - start
    probabilities = {s: np.asarray(head.predict(data.x(s), verbose=0)) for s in schema.EVAL_SPLITS}
    labels = {s: data.labels(s) for s in schema.EVAL_SPLITS}
    records = data.records

    from ecg_mlflow.model.evaluation import evaluate

    metrics = {**evaluate("test", labels["test"], probabilities["test"]),
               **evaluate("val", labels["val"], probabilities["val"])}
    metrics.update({
        schema.METRIC_BEST_EPOCH: history.best_epoch,
        schema.METRIC_STOPPED_EPOCH: history.stopped_epoch,
        schema.METRIC_LEAKAGE_EXACT: leakage.exact,
        schema.METRIC_LEAKAGE_NEAR: leakage.near,
        schema.METRIC_TIME_FEATURES: cache.seconds,
        schema.METRIC_TIME_HEAD: time_head,
        schema.METRIC_CACHE_HITS: cache.hits,
        schema.METRIC_CACHE_MISSES: cache.misses,
    })
    # At the last epoch's step: `val_loss`/`val_accuracy` are both per-epoch curves and
    # final metrics, and MLflow shows the value of the highest step, the restored best model.
    mlflow.log_metrics(metrics, step=history.stopped_epoch)
    _log_artifacts(config, manifest, split, records, labels["test"], probabilities["test"], history)

    max_diff = None
    if config.log_model:
        test_sample = list(split.test[:EQUALITY_SAMPLES])
        from ecg_mlflow.tracking.model_logging import log_whole_model

        max_diff = log_whole_model(config, head, [manifest.path_of(records[p]) for p in test_sample],
                                   data.features_of(test_sample),
                                   lambda message: _say(progress, f"{run_name(config)}: {message}"))
    _say(progress, f"{run_name(config)}: test accuracy {metrics['test_accuracy']:.3f}, "
                   f"macro F1 {metrics['test_f1_macro']:.3f} (run {run.info.run_id})")
    return TrainResult(run.info.run_id, metrics, split, leakage, cache, max_diff)


def backend_tags() -> dict[str, str]:
    """Which Keras backend computed the run and on what device: a model trained under one
    serves under the other, but features and numbers differ in the last digits."""
    from ecg_mlflow.model.backend import backend_name, device_kind

    return {schema.TAG_KERAS_BACKEND: backend_name(), schema.TAG_DEVICE: device_kind()}


@dataclass(frozen=True)
class PreparedData:
    """A split with the cached backbone features of every image, ready for heads."""

    manifest: Manifest
    split: Split
    records: dict[str, ImageRecord]
    features: dict[str, np.ndarray]  # by sha256
    cache: CacheStats

    def features_of(self, relpaths) -> np.ndarray:
        return np.stack([self.features[self.records[p].sha256] for p in relpaths])

    def labels(self, subset: str) -> list[str]:
        return [self.records[p].label for p in getattr(self.split, subset)]

    def x(self, subset: str) -> np.ndarray:
        return self.features_of(getattr(self.split, subset))

    def xy(self, subset: str) -> tuple[np.ndarray, np.ndarray]:
        """Features and one-hot labels of `train`, `val` or `test`."""
        from ecg_mlflow.model.head import one_hot

        return self.x(subset), one_hot(self.labels(subset))


def prepare_features(
    config: TrainConfig, manifest: Manifest, split: Split, *, progress: bool = True
) -> PreparedData:
    """Backbone features of every unique image of the manifest, through the cache."""
    records = {r.relpath: r for r in manifest.records}
    paths_by_sha: dict[str, Path] = {}
    for record in manifest.records:
        paths_by_sha.setdefault(record.sha256, manifest.path_of(record))
    key = FeatureKey(config.arch, config.weights, config.image_height, config.image_width, config.crop)
    _say(progress, f"{run_name(config)}: features for {len(paths_by_sha)} unique images of {len(records)} files")
    features, cache = extract_features(
        paths_by_sha, key, config.cache_dir or default_cache_dir(), progress=progress
    )
    _say(progress, f"{run_name(config)}: cache hits {cache.hits}, backbone passes {cache.misses}")
    return PreparedData(manifest, split, records, features, cache)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, flush=True)


def _log_params(run_id: str, config: TrainConfig, manifest: Manifest, split: Split) -> None:
    """Log the effective parameters, canonically spelled, beside what `mlflow run` logged."""
    params = config.as_params()
    params.update({schema.HEAD_PARAM_PREFIX + k: params[k] for k in HEAD_FIELDS})
    params.update({
        schema.PARAM_DATA_DIGEST: manifest.digest,
        schema.PARAM_TEST_DIGEST: split.test_digest,
        schema.PARAM_N_TRAIN: str(len(split.train)),
        schema.PARAM_N_VAL: str(len(split.val)),
        schema.PARAM_N_TEST: str(len(split.test)),
    })
    log_unlogged_params(run_id, params)



def _log_dataset(manifest: Manifest, source: str) -> None:
    import warnings

    import mlflow

    frame = manifest.to_frame()
    with warnings.catch_warnings():  # MLflow's hints about source kinds and integer columns
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(
            frame, source=str(Path(source).resolve()), name=Path(source).name or "dataset",
            digest=manifest.digest[:36],
        )
        _log_input_once_stored(dataset)


def _log_input_once_stored(dataset, attempts: int = 4) -> None:
    """mlflow.log_input, retried when a concurrent run inserted the same dataset first: the
    MLflow server answers that race with a unique-key error, and the retry finds the row."""
    import mlflow
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context="training")
            return
        except MlflowException as exc:
            duplicate = "UniqueViolation" in str(exc) or "UNIQUE constraint" in str(exc)
            if not duplicate or attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


def _log_artifacts(config, manifest, split, records, test_labels, test_probs, history) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    from ecg_mlflow.model.evaluation import (
        confusion, confusion_json, plot_confusion, plot_curves, predictions_frame,
    )

    frame = predictions_frame(split.test, [records[p].sha256 for p in split.test], test_labels, test_probs)
    mlflow.log_text(frame.to_csv(index=False), schema.ARTIFACT_PREDICTIONS)
    matrix = confusion(frame[schema.COL_TRUE], frame[schema.COL_PRED])
    mlflow.log_text(confusion_json(matrix), schema.ARTIFACT_CONFUSION_JSON)
    title = f"{run_name(config)} test set (n={len(split.test)})"
    for figure, artifact in ((plot_confusion(matrix, title), schema.ARTIFACT_CONFUSION_PNG),
                             (plot_curves(history, run_name(config)), schema.ARTIFACT_CURVES)):
        mlflow.log_figure(figure, artifact)
        plt.close(figure)
    mlflow.log_text(split.to_frame(manifest).to_csv(index=False), schema.ARTIFACT_SPLIT)
