"""The Numba kernels of the seeds-together trainer against NumPy: the forward pass, the
input gradient and the fused gradient + Adam step, on shapes whose rows and batch are
not multiples of the kernels' blocks of four, and the step's two sweep directions."""

import numpy as np
import pytest

from ecg_mlflow.model.head_kernels import (FORWARD_CHUNKS, bias_step, dense_forward, dense_step, input_gradient,
                                           sum_chunks)
from ecg_mlflow.model.seed_heads import _adam_scalars

SHAPES = [(16, 1280, 1024), (13, 1030, 7), (1, 3, 5), (5, 512, 4)]  # batch, inputs, outputs


def _arrays(batch, n_in, n_out):
    rng = np.random.default_rng(n_in * 31 + batch)
    f32 = np.float32
    x = np.abs(rng.normal(size=(batch, n_in))).astype(f32)
    kernel = (rng.normal(size=(n_in, n_out)) * 0.05).astype(f32)
    grad = (rng.normal(size=(batch, n_out)) * 0.1).astype(f32)
    m = (rng.normal(size=(n_in, n_out)) * 1e-3).astype(f32)
    v = (rng.random((n_in, n_out)) * 1e-5).astype(f32)
    return x, kernel, grad, m, v


def _numpy_adam(weights, gradient, m, v, alpha, one_minus_beta_1, one_minus_beta_2, epsilon):
    """Keras' Adam.update_step in float32 NumPy."""
    m = m + (gradient - m) * one_minus_beta_1
    v = v + (gradient * gradient - v) * one_minus_beta_2
    return weights - (m * alpha) / (np.sqrt(v) + epsilon), m, v


@pytest.mark.parametrize("batch,n_in,n_out", SHAPES)
def test_forward_and_input_gradient_are_the_matmuls(batch, n_in, n_out):
    x, kernel, grad, _, _ = _arrays(batch, n_in, n_out)
    bias = np.linspace(-1, 1, n_out).astype(np.float32)
    out = np.empty((batch, n_out), np.float32)
    dense_forward(x, kernel, bias, out)
    np.testing.assert_allclose(out, x @ kernel + bias, rtol=1e-5, atol=1e-5)
    below = np.empty((batch, n_in), np.float32)
    input_gradient(grad, kernel, below)
    np.testing.assert_allclose(below, grad @ kernel.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch,n_in,n_out", SHAPES)
def test_the_step_is_adam_on_the_weight_gradient_in_either_sweep(batch, n_in, n_out):
    x, kernel, grad, m, v = _arrays(batch, n_in, n_out)
    adam = _adam_scalars(1e-3, 7)
    expected = _numpy_adam(kernel, x.T.astype(np.float64) @ grad, m, v, *adam)
    swept = {}
    for backwards in (False, True):
        state = [kernel.copy(), m.copy(), v.copy()]
        dense_step(np.ascontiguousarray(x.T), grad, *state, *adam, backwards=backwards)
        swept[backwards] = state
        for got, want in zip(state, expected):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    for forwards, backwards in zip(swept[False], swept[True]):
        assert np.array_equal(forwards, backwards)  # rows are independent: same bits


@pytest.mark.parametrize("batch,n_in,n_out", SHAPES)
def test_the_step_forms_the_next_forward_pass_bit_for_bit(batch, n_in, n_out):
    """Given the next batch, the step's updated rows also go into that batch's forward
    sums: the same update as without, and the same bits as dense_forward on the updated
    kernel, in either sweep (the next batch may be shorter: an epoch's last one)."""
    x, kernel, grad, m, v = _arrays(batch, n_in, n_out)
    next_x = np.abs(np.random.default_rng(n_in).normal(size=(max(1, batch - 3), n_in))).astype(np.float32)
    bias = np.linspace(-1, 1, n_out).astype(np.float32)
    adam = _adam_scalars(1e-3, 7)
    for backwards in (False, True):
        plain = [kernel.copy(), m.copy(), v.copy()]
        dense_step(np.ascontiguousarray(x.T), grad, *plain, *adam, backwards=backwards)
        fused = [kernel.copy(), m.copy(), v.copy()]
        partial = np.full((FORWARD_CHUNKS, len(next_x), n_out), np.nan, np.float32)
        dense_step(np.ascontiguousarray(x.T), grad, *fused, *adam, backwards, next_x, partial)
        for a, b in zip(plain, fused):
            assert np.array_equal(a, b)
        ahead, forward = (np.empty((len(next_x), n_out), np.float32) for _ in range(2))
        sum_chunks(partial, bias, ahead)
        dense_forward(next_x, fused[0], bias, forward)
        assert np.array_equal(ahead, forward)


def test_the_bias_step_is_adam_on_the_summed_gradient():
    _, _, grad, _, _ = _arrays(13, 3, 7)
    bias, m, v = np.zeros(7, np.float32), np.full(7, 1e-3, np.float32), np.full(7, 1e-5, np.float32)
    adam = _adam_scalars(1e-3, 0)
    expected = _numpy_adam(bias, grad.sum(0), m, v, *adam)
    bias_step(grad, bias, m, v, *adam)
    for got, want in zip((bias, m, v), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


def test_subnormal_moments_flush_to_zero_as_under_keras_adam():
    """Keras' Adam runs in TensorFlow's threads, which flush subnormals (FTZ and DAZ): a
    first moment of 1e-39 with a zero gradient becomes 0, not 9e-40. The step does the
    same (model/denormals.py), so moments never linger in the slow subnormal range."""
    import keras
    import tensorflow as tf

    tiny = np.float32(1e-39)  # subnormal: below float32's smallest normal, 1.18e-38
    kernel = np.ones((4, 8), np.float32)
    m, v = np.full_like(kernel, tiny), np.full_like(kernel, 1e-6)
    optimizer = keras.optimizers.Adam(1e-3)
    variable = keras.Variable(kernel.copy())
    optimizer.build([variable])
    optimizer._momentums[0].assign(m)
    optimizer._velocities[0].assign(v)
    optimizer.apply_gradients([(tf.zeros_like(kernel), variable)])
    keras_m = optimizer._momentums[0].numpy()
    assert np.all(keras_m == 0)

    dense_step(np.zeros((4, 2), np.float32), np.zeros((2, 8), np.float32), kernel, m, v, *_adam_scalars(1e-3, 0))
    assert np.array_equal(m, keras_m)


def test_the_kernels_leave_their_threads_float_mode_as_it_was():
    """Flushing is for the kernels alone: afterwards NumPy on this thread and Numba's
    worker threads still produce subnormals (IEEE gradual underflow)."""
    from numba import njit, prange

    @njit(parallel=True)
    def products(a, b):
        out = np.empty_like(a)
        for i in prange(len(a)):
            out[i] = a[i] * b[i]
        return out

    x, kernel, grad, m, v = _arrays(16, 64, 32)
    dense_step(np.ascontiguousarray(x.T), grad, kernel, m, v, *_adam_scalars(1e-3, 0))
    dense_forward(x, kernel, np.zeros(32, np.float32), np.empty((16, 32), np.float32))
    input_gradient(grad, kernel, np.empty((16, 64), np.float32))
    bias_step(grad, np.zeros(32, np.float32), np.zeros(32, np.float32), np.zeros(32, np.float32),
              *_adam_scalars(1e-3, 0))
    small = np.full(4096, 1e-20, np.float32)
    assert np.all(small * small > 0)  # 1e-40: subnormal, not flushed
    assert np.all(products(small, small) > 0)
