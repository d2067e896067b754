"""The head has the paper's shape, learns, stops early with the best weights, and is
reproducible for a seed."""

from __future__ import annotations

import numpy as np

import pytest

from ecg_mlflow.model.head import HeadConfig, build_head, head_probabilities, one_hot, train_head


def _blobs(seed: int, n_train: int = 80, n_val: int = 40, dim: int = 16):
    """Four separable Gaussian blobs, split into training and validation rows."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n_train + n_val)
    centres = rng.normal(0, 3, (4, dim))
    x = (centres[labels] + rng.normal(0, 1, (len(labels), dim))).astype(np.float32)
    y = np.eye(4, dtype=np.float32)[labels]
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def test_head_shape_is_the_papers():
    head = build_head(2048, (1024, 512), 0.2)
    kinds = [(layer.__class__.__name__, getattr(layer, "units", None)) for layer in head.layers[1:]]
    assert kinds == [("Dense", 1024), ("Dropout", None), ("Dense", 512), ("Dropout", None), ("Dense", 4)]
    assert head.layers[-1].activation.__name__ == "softmax"


def test_head_learns_and_restores_best_epoch():
    x, y, xv, yv = _blobs(0)
    config = HeadConfig(dense_units=(32, 16), learning_rate=1e-2, batch_size=16, max_epochs=40, patience=3)
    epochs = []
    head, history = train_head(x, y, xv, yv, config, seed=3, on_epoch_end=lambda e, logs: epochs.append(e))
    assert epochs == list(range(1, history.stopped_epoch + 1))
    assert history.best_epoch == int(np.argmin(history.val_loss)) + 1
    # Restored weights are the best epoch's: evaluating now gives the best validation loss.
    import keras

    loss = float(keras.losses.categorical_crossentropy(yv, head.predict(xv, verbose=0)).numpy().mean())
    assert abs(loss - min(history.val_loss)) < 1e-4
    assert history.val_accuracy[history.best_epoch - 1] > 0.6


def test_same_seed_same_head_different_seed_differs():
    x, y, xv, yv = _blobs(1)
    config = HeadConfig(dense_units=(16,), learning_rate=1e-2, batch_size=8, max_epochs=5, patience=5)
    a, _ = train_head(x, y, xv, yv, config, seed=7)
    b, _ = train_head(x, y, xv, yv, config, seed=7)
    c, _ = train_head(x, y, xv, yv, config, seed=8)
    np.testing.assert_array_equal(a.predict(xv, verbose=0), b.predict(xv, verbose=0))
    assert not np.allclose(a.predict(xv, verbose=0), c.predict(xv, verbose=0))


def test_one_hot_follows_canonical_class_order():
    np.testing.assert_array_equal(one_hot(["NORM", "MI"]), [[0, 0, 0, 1], [1, 0, 0, 0]])


def test_head_probabilities_are_keras_predict_of_the_trained_head():
    """The NumPy forward the runs' metrics use is Keras' predict, to float32 rounding
    (dropout off at inference), on a trained head with two hidden layers."""
    x, y, xv, yv = _blobs(1)
    config = HeadConfig(dense_units=(32, 16), dropout=0.3, learning_rate=1e-2, max_epochs=5, patience=5)
    head, _ = train_head(x, y, xv, yv, config, seed=2)
    expected = head.predict(xv, verbose=0)
    np.testing.assert_allclose(head_probabilities(head, xv), expected, atol=1e-6, rtol=0)
    assert head_probabilities(head, xv).dtype == np.float32


def test_head_probabilities_refuse_a_head_they_cannot_compute():
    import keras

    inputs = keras.Input(shape=(8,))
    hidden = keras.layers.Dense(4, activation="tanh", name="tanh_dense")(inputs)
    odd = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(hidden), name="odd")
    with pytest.raises(ValueError, match="odd: layer tanh_dense is not a ReLU Dense or a Dropout layer"):
        head_probabilities(odd, np.zeros((2, 8), np.float32))
