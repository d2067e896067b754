"""Dropout masks drawn in Numba are TensorFlow's stateless dropout, bit for bit: what
Keras' Dropout applies under TensorFlow at seed [layer seed, step]."""

import numpy as np
import pytest

from ecg_mlflow.model.dropout_masks import SEED_MODULUS, dropout_masks


def tensorflow_masks(layer_seed: int, first_step: int, steps: int, batch: int, width: int, rate: float):
    """Keras' Dropout under TensorFlow, one step at a time: stateless_dropout of ones at
    the int32 seed floormod([layer seed, step], 2^31 - 2)."""
    import tensorflow as tf

    masks = []
    for step in range(first_step, first_step + steps):
        seed = tf.cast(tf.math.floormod(tf.constant([layer_seed, step], tf.int64), SEED_MODULUS), tf.int32)
        masks.append(tf.nn.experimental.stateless_dropout(tf.ones([batch, width]), rate=rate, seed=seed).numpy())
    return np.stack(masks)


@pytest.mark.parametrize("layer_seeds,first_step,steps,batch,widths,rate", [
    ((123, 456), 0, 5, 16, (1024, 512), 0.2),  # the paper's head
    ((2**40 + 7, -5), 1000, 3, 13, (7, 33), 0.5),  # big and negative seeds; widths not multiples of 4
    ((0, 2**31), SEED_MODULUS - 2, 4, 1, (3, 1), 0.9),  # steps wrapping the modulus
])
def test_masks_are_tensorflows_stateless_dropout(layer_seeds, first_step, steps, batch, widths, rate):
    masks = dropout_masks(np.array(layer_seeds, np.int64), first_step, steps, batch, widths, rate)
    assert [m.shape for m in masks] == [(steps, batch, w) for w in widths]
    for mask, seed, width in zip(masks, layer_seeds, widths):
        assert mask.dtype == np.float32
        assert np.array_equal(mask, tensorflow_masks(seed, first_step, steps, batch, width, rate))


def test_masks_drop_at_the_rate_and_differ_by_seed_and_step():
    first, second = dropout_masks(np.array([1, 2]), 0, 50, 16, (1024, 1024), 0.2)
    assert abs((first == 0).mean() - 0.2) < 0.01
    assert set(np.unique(first)) == {np.float32(0), np.float32(1 / 0.8)}
    assert not np.array_equal(first, second)
    assert not np.array_equal(first[0], first[1])
