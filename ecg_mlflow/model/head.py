"""The dense head of the paper, trained on cached backbone features."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ecg_mlflow.data.classes import CLASSES
from ecg_mlflow.model.backend import make_deterministic

PAPER_DENSE_UNITS: tuple[int, ...] = (1024, 512)
PAPER_DROPOUT = 0.2
PAPER_LEARNING_RATE = 1e-4
PAPER_BATCH_SIZE = 16
PAPER_MAX_EPOCHS = 100
PAPER_PATIENCE = 5


@dataclass(frozen=True)
class HeadConfig:
    """Shape and optimisation of the head; the defaults are the paper's."""

    dense_units: tuple[int, ...] = PAPER_DENSE_UNITS
    dropout: float = PAPER_DROPOUT
    learning_rate: float = PAPER_LEARNING_RATE
    batch_size: int = PAPER_BATCH_SIZE
    max_epochs: int = PAPER_MAX_EPOCHS
    patience: int = PAPER_PATIENCE


@dataclass
class HeadHistory:
    """Per-epoch curves (epoch 1 first) and where early stopping settled."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    best_epoch: int = 0
    stopped_epoch: int = 0


def build_head(feature_dim: int, dense_units: Sequence[int], dropout: float):
    """GAP features -> Dense(relu) + Dropout per entry of `dense_units` -> Dense(4, softmax)."""
    import keras

    inputs = keras.Input(shape=(feature_dim,), name="features")
    x = inputs
    for index, units in enumerate(dense_units, start=1):
        x = keras.layers.Dense(units, activation="relu", name=f"dense_{index}")(x)
        x = keras.layers.Dropout(dropout, name=f"dropout_{index}")(x)
    outputs = keras.layers.Dense(len(CLASSES), activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="head")


def head_probabilities(head, features: np.ndarray) -> np.ndarray:
    """The head's class probabilities at inference, in float32 NumPy from its weights.

    What Keras' predict computes (to float32 rounding), without it: predict traces a graph
    for every new head and input shape, about a second per run for a head's test and
    validation sets, and this is the same under every Keras backend. ValueError for a head
    of other layers (explain.head_layers)."""
    from ecg_mlflow.model.explain import head_layers, softmax

    dense, (kernel, bias) = head_layers(head)
    x = np.asarray(features, np.float32)
    for w, b in dense:
        x = np.maximum(x @ w + b, 0)
    return softmax(x @ kernel + bias)


def one_hot(labels: Sequence[str]) -> np.ndarray:
    """Class names -> one-hot rows in the canonical class order."""
    index = np.array([CLASSES.index(label) for label in labels])
    return np.eye(len(CLASSES), dtype=np.float32)[index]


def train_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    config: HeadConfig,
    seed: int,
    *,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    extra_callbacks: Sequence = (),
    shuffle: bool = True,
):
    """Fit the head as the paper did: Adam, categorical cross-entropy, early stopping on
    validation loss with the best weights restored. Same seed and data, same weights.

    Returns the trained Keras head and its HeadHistory. `on_epoch_end(epoch, logs)` is
    called with 1-based epochs (used to log curves and to prune Optuna trials).
    `shuffle=False` only serves benchmarks that compare against a fused model.
    """
    import keras

    make_deterministic(seed)
    head = build_head(x_train.shape[1], config.dense_units, config.dropout)
    head.compile(
        optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    stopper = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=config.patience, restore_best_weights=True
    )
    callbacks = [stopper, *extra_callbacks]
    if on_epoch_end is not None:
        callbacks.append(
            keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: on_epoch_end(epoch + 1, dict(logs or {}))
            )
        )
    fit = head.fit(
        x_train,
        y_train,
        validation_data=(x_val, y_val),
        batch_size=config.batch_size,
        epochs=config.max_epochs,
        shuffle=shuffle,
        callbacks=callbacks,
        verbose=0,
    )
    curves = fit.history
    history = HeadHistory(
        loss=[float(v) for v in curves["loss"]],
        accuracy=[float(v) for v in curves["accuracy"]],
        val_loss=[float(v) for v in curves["val_loss"]],
        val_accuracy=[float(v) for v in curves["val_accuracy"]],
    )
    history.stopped_epoch = len(history.val_loss)
    history.best_epoch = int(np.argmin(history.val_loss)) + 1
    return head, history
