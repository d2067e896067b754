"""The whole model (input scaling, frozen backbone, pooling, head), assembled after training
and checked against the head on cached features before anything logs it."""

from __future__ import annotations

import numpy as np

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ecg_mlflow.config import TrainConfig

EQUALITY_TOLERANCE = 1e-5


def assemble_model(config: TrainConfig, head, extractor=None):
    """The whole model, RGB 0..255 in, class probabilities out: input scaling, frozen
    backbone, pooling (one feature extractor) and the trained head. `extractor` is the one
    that computed the features (default: the shared one of `config`'s feature key, at its
    Keras precision), so a backbone built at another precision serves as it computed."""
    import keras

    from ecg_mlflow.model.features import key_extractor

    if extractor is None:
        extractor = key_extractor(config.feature_key())
    inputs = keras.Input(shape=(config.image_height, config.image_width, 3), name="image", dtype="float32")
    outputs = head(extractor(inputs))
    return keras.Model(inputs, outputs, name=f"ecg_{config.arch}")


def check_model_matches_head(runner, head, pixels: np.ndarray, features: np.ndarray) -> float:
    """Max abs difference between the whole model on images, run as it will be served
    (`runner`, engines.whole_model_runner: the run's engine and precision), and the head on
    cached features; above EQUALITY_TOLERANCE the model would not be the one evaluated."""
    whole = np.asarray(runner.predict(pixels))
    from ecg_mlflow.model.head import head_probabilities

    cached = head_probabilities(head, features)  # what the run's metrics were computed from
    diff = float(np.abs(whole - cached).max())
    if diff > EQUALITY_TOLERANCE:
        raise RuntimeError(
            f"the assembled model disagrees with the trained head on cached features "
            f"(max abs difference {diff:.2e} > {EQUALITY_TOLERANCE:.0e}); the feature cache "
            "may be stale: clear it and rerun"
        )
    return diff
