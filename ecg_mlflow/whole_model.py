"""The logged model: the whole model (input scaling, frozen backbone, pooling, head)
assembled after training, checked against the head on cached features, then logged."""

from __future__ import annotations

import functools

import numpy as np

from ecg_mlflow import names
from ecg_mlflow.config import TrainConfig

EQUALITY_TOLERANCE = 1e-5


def assemble_model(config: TrainConfig, head):
    """The whole model, RGB 0..255 in, class probabilities out: input scaling, frozen
    backbone, pooling (one feature extractor) and the trained head."""
    import keras

    from ecg_mlflow.backbones import shared_feature_extractor

    extractor = shared_feature_extractor(config.arch, config.weights, config.image_height, config.image_width)
    inputs = keras.Input(shape=(config.image_height, config.image_width, 3), name="image", dtype="float32")
    outputs = head(extractor(inputs))
    return keras.Model(inputs, outputs, name=f"ecg_{config.arch}")


def check_model_matches_head(model, head, pixels: np.ndarray, features: np.ndarray) -> float:
    """Max abs difference between the whole model on images and the head on cached
    features; above EQUALITY_TOLERANCE the model would not be the one that was evaluated."""
    whole = np.asarray(model.predict(pixels, verbose=0))
    cached = np.asarray(head.predict(features, verbose=0))
    diff = float(np.abs(whole - cached).max())
    if diff > EQUALITY_TOLERANCE:
        raise RuntimeError(
            f"the assembled model disagrees with the trained head on cached features "
            f"(max abs difference {diff:.2e} > {EQUALITY_TOLERANCE:.0e}); the feature cache "
            "may be stale: clear it and rerun"
        )
    return diff


def sample_pixels(image_paths, height: int, width: int, crop: str) -> np.ndarray:
    """The check's images, decoded once per process: every seed of a study checks its
    model on the same test images. Keyed by each file's size and modification time too,
    so a file changed on disk is decoded again."""
    from pathlib import Path

    stamps = tuple((str(p), Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in image_paths)
    pixels = _decoded(stamps, height, width, crop)
    pixels.flags.writeable = False  # shared between calls
    return pixels


@functools.lru_cache(maxsize=2)
def _decoded(stamps: tuple, height: int, width: int, crop: str) -> np.ndarray:
    from ecg_mlflow.preprocess import load_batch

    return load_batch([path for path, _, _ in stamps], height, width, crop)


def model_signature(height: int, width: int):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, height, width, 3), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 4), "probabilities")]),
    )


def pinned_requirements(*packages: str) -> list[str]:
    """`name==version` of installed packages, so MLflow skips slow requirement inference."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in packages]


def log_whole_model(config: TrainConfig, head, image_paths, features, say) -> float:
    import mlflow

    model = assemble_model(config, head)
    pixels = sample_pixels(image_paths, config.image_height, config.image_width, config.crop)
    diff = check_model_matches_head(model, head, pixels, features)
    mlflow.log_metric("model_max_abs_diff", diff)
    say(f"whole model equals head on cached features (max abs diff {diff:.1e}); logging it")
    mlflow.keras.log_model(
        model,
        name=names.MODEL_ARTIFACT,
        signature=model_signature(config.image_height, config.image_width),
        pip_requirements=pinned_requirements("mlflow", "keras", "tensorflow-cpu"),
    )
    return diff
