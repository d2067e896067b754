"""One training run: features from the cache, the paper's head, everything logged.

A run is three pieces: `prepare_run` (split, leakage, features), a trainer
(`train_prepared` for one seed, `start_prepared_together` for all seeds of one backbone,
in a child process) and the logging (`log_run_inputs`, `log_run_outcome`) into the active
MLflow run, which the caller opens: the `train` command and `mlflow run` through
`train_and_log`, the study driver per child run after training its seeds together. One
way to log, whoever trained.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ecg_mlflow import schema
from ecg_mlflow.config import HEAD_FIELDS, ConfigError, TrainConfig
from ecg_mlflow.data.manifest import ImageRecord, Manifest, build_manifest
from ecg_mlflow.model.features import CacheStats, default_cache_dir
from ecg_mlflow.model.region_cache import extract_features_and_region_maps
from ecg_mlflow.data.splits import Leakage, Split, make_split, measure_leakage
from ecg_mlflow.tracking.params import log_unlogged_params

EQUALITY_SAMPLES = 4
LOG_BATCH_METRICS = 1000  # MLflow's limit per log_batch request


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
    config: TrainConfig, *, manifest: Manifest | None = None, progress: bool = True,
    split: Split | None = None,
) -> TrainResult:
    """Train one head on cached features and log the run schema into the active run.
    `split` (a cross-validation fold) replaces the split `config.split` would draw."""
    _require_active_run("train_and_log")
    manifest = manifest if manifest is not None else load_dataset(config.data, progress=progress)
    run = prepare_run(config, manifest, progress=progress, split=split)
    log_run_inputs(run)
    return log_run_outcome(run, train_prepared(run), progress=progress)


@dataclass(frozen=True)
class PreparedRun:
    """One run before its head trains: the effective configuration, its split, the
    leakage it measures and the cached features."""

    config: TrainConfig
    manifest: Manifest
    split: Split
    leakage: Leakage
    data: "PreparedData"


@dataclass(frozen=True)
class TrainedHead:
    """A trained head, its curves and the seconds its training took."""

    head: object
    history: object  # ecg_mlflow.model.head.HeadHistory
    seconds: float


def prepare_run(config: TrainConfig, manifest: Manifest, *, progress: bool = True,
                split: Split | None = None) -> PreparedRun:
    """Split (the one `config.split` draws, unless a fold's `split` is given), leakage and
    features of a run; `config` is what config.resolve_train_config settled (head_config
    applied), and it is logged as it is."""
    split = split if split is not None else make_split(manifest, config.split, config.seed)
    leakage = measure_leakage(manifest, split)
    return PreparedRun(config, manifest, split, leakage, prepare_features(config, manifest, split, progress=progress))


def train_prepared(run: PreparedRun) -> TrainedHead:
    """One seed's head with Keras' fit (`train_head`)."""
    from ecg_mlflow.model.head import train_head

    start = time.perf_counter()
    head, history = train_head(*run.data.xy("train"), *run.data.xy("val"), run.config.head_config_obj(),
                               run.config.seed)
    return TrainedHead(head, history, time.perf_counter() - start)


@dataclass
class HeadsTogether:
    """The heads of several seeds of one backbone and head configuration, training in one
    computation in a child process (model/head_process.py) while the caller goes on."""

    runs: Sequence[PreparedRun]
    training: object  # ecg_mlflow.model.head_process.HeadsInChildProcess

    def result(self) -> list[TrainedHead]:
        """Each run's head, in the order of `runs`; its `seconds` is its share of the joint
        training time, in proportion to the epochs it trained."""
        trained, seconds = self.training.result()
        epochs = sum(history.stopped_epoch for _, history in trained.values())
        return [TrainedHead(*trained[r.config.seed], seconds * trained[r.config.seed][1].stopped_epoch / epochs)
                for r in self.runs]

    def close(self) -> None:
        """Stop the training if it still runs."""
        self.training.close()


def start_prepared_together(runs: Sequence[PreparedRun]) -> HeadsTogether:
    """Start training the heads of `runs` (distinct seeds of one backbone, data and head)
    together (`train_seed_heads`, in a child process)."""
    from ecg_mlflow.model.head import one_hot
    from ecg_mlflow.model.head_process import HeadsInChildProcess
    from ecg_mlflow.model.seed_heads import SeedRows

    first = runs[0]
    if any((r.config.arch, r.config.head_config_obj(), r.manifest.digest)
           != (first.config.arch, first.config.head_config_obj(), first.manifest.digest) for r in runs):
        raise ValueError("seeds trained together must share the data, the backbone and the head")
    relpaths = [r.relpath for r in first.manifest.records]
    index = {p: i for i, p in enumerate(relpaths)}
    features = first.data.features_of(relpaths)
    labels = one_hot([first.data.records[p].label for p in relpaths])
    rows = [SeedRows(r.config.seed, np.array([index[p] for p in r.split.train]),
                     np.array([index[p] for p in r.split.val])) for r in runs]
    return HeadsTogether(runs, HeadsInChildProcess(features, labels, rows, first.config.head_config_obj()))


def log_run_inputs(run: PreparedRun) -> None:
    """What the run trains on, into the active run: params, role, dataset, head.json."""
    import mlflow

    config = run.config
    if config.head_config:
        mlflow.log_dict({k: getattr(config, k) for k in HEAD_FIELDS}, schema.ARTIFACT_HEAD)
    _log_params(_require_active_run("log_run_inputs"), config, run.manifest, run.split)
    mlflow.set_tags({schema.TAG_ROLE: schema.ROLE_TRAIN, **backend_tags()})
    _log_dataset(run.manifest, config.data)


def log_run_outcome(run: PreparedRun, trained: TrainedHead, *, progress: bool = True) -> TrainResult:
    """What the trained head gives, into the active run: per-epoch curves, metrics,
    artifacts and the whole model (checked against the head on cached features)."""
    import mlflow

    from ecg_mlflow.model.evaluation import evaluate
    from ecg_mlflow.model.head import head_probabilities

    run_id = _require_active_run("log_run_outcome")
    config, data, split, history = run.config, run.data, run.split, trained.history
    _log_curves(run_id, history)
    probabilities = {s: head_probabilities(trained.head, data.x(s)) for s in schema.EVAL_SPLITS}
    labels = {s: data.labels(s) for s in schema.EVAL_SPLITS}
    metrics = {**evaluate("test", labels["test"], probabilities["test"]),
               **evaluate("val", labels["val"], probabilities["val"])}
    metrics.update({
        schema.METRIC_BEST_EPOCH: history.best_epoch,
        schema.METRIC_STOPPED_EPOCH: history.stopped_epoch,
        schema.METRIC_LEAKAGE_EXACT: run.leakage.exact,
        schema.METRIC_LEAKAGE_NEAR: run.leakage.near,
        schema.METRIC_TIME_FEATURES: data.cache.seconds,
        schema.METRIC_TIME_HEAD: trained.seconds,
        schema.METRIC_CACHE_HITS: data.cache.hits,
        schema.METRIC_CACHE_MISSES: data.cache.misses,
    })
    metrics.update(_log_explanations(config, trained.head, data))
    # At the last epoch's step: `val_loss`/`val_accuracy` are both per-epoch curves and
    # final metrics, and MLflow shows the value of the highest step, the restored best model.
    mlflow.log_metrics(metrics, step=history.stopped_epoch)
    _log_artifacts(config, run.manifest, split, data.records, labels["test"], probabilities["test"], history)

    max_diff = None
    if config.log_model:
        test_sample = list(split.test[:EQUALITY_SAMPLES])
        from ecg_mlflow.tracking.model_logging import log_whole_model

        max_diff = log_whole_model(config, trained.head, [run.manifest.path_of(data.records[p]) for p in test_sample],
                                   data.features_of(test_sample),
                                   lambda message: _say(progress, f"{run_name(config)}: {message}"))
    _say(progress, f"{run_name(config)}: test accuracy {metrics['test_accuracy']:.3f}, "
                   f"macro F1 {metrics['test_f1_macro']:.3f} (run {run_id})")
    return TrainResult(run_id, metrics, split, run.leakage, data.cache, max_diff)


def _require_active_run(who: str) -> str:
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError(f"{who} needs an active MLflow run")
    return run.info.run_id


def _log_curves(run_id: str, history) -> None:
    """The per-epoch curves (step = epoch) in one request, whichever trainer made them."""
    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    curves = [Metric(key, float(value), now, epoch)
              for key in schema.EPOCH_METRICS
              for epoch, value in enumerate(getattr(history, key), start=1)]
    client = mlflow.MlflowClient()
    for start in range(0, len(curves), LOG_BATCH_METRICS):
        client.log_batch(run_id, metrics=curves[start:start + LOG_BATCH_METRICS])


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
    region_maps: dict[str, np.ndarray] | None = None  # by sha256: (regions, feature_dim), model/regions.py

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
    """Backbone features (and region-pooled maps, same pass) of every unique image of the
    manifest, through the cache; the same pass keeps the full maps of the test images
    the run's overlays will show."""
    from ecg_mlflow.tracking.explanations import overlay_sample

    records = {r.relpath: r for r in manifest.records}
    test = [records[p] for p in split.test]
    overlaid = {test[i].sha256 for i in overlay_sample([r.relpath for r in test], [r.label for r in test],
                                                       [r.sha256 for r in test])}
    paths_by_sha: dict[str, Path] = {}
    for record in manifest.records:
        paths_by_sha.setdefault(record.sha256, manifest.path_of(record))
    key = config.feature_key()
    _say(progress, f"{run_name(config)}: features for {len(paths_by_sha)} unique images of {len(records)} files")
    features, region_maps, cache = extract_features_and_region_maps(
        paths_by_sha, key, config.cache_dir or default_cache_dir(), progress=progress, full_maps_of=overlaid
    )
    _say(progress, f"{run_name(config)}: cache hits {cache.hits}, backbone passes {cache.misses}")
    return PreparedData(manifest, split, records, features, cache, region_maps)


def _log_explanations(config: TrainConfig, head, data: PreparedData) -> dict[str, float]:
    """Grad-CAM per region of every test image from the cached region maps, and overlays of
    a sample (tracking/explanations.py); returns the text-share metrics."""
    from ecg_mlflow.tracking.explanations import log_explanations

    test = list(data.split.test)
    shas = [data.records[p].sha256 for p in test]
    return log_explanations(
        config.feature_key(), config.cache_dir or default_cache_dir(), head, test, shas, data.labels("test"),
        data.x("test"), np.stack([data.region_maps[s] for s in shas]),
        [data.manifest.path_of(data.records[p]) for p in test], run_name(config),
    )


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
