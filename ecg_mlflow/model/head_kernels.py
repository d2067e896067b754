"""A head's training step in Numba: forward pass, input gradient, and Keras' Adam step of
each dense layer fused with the layer's weight gradient (model/seed_heads.py runs them).

At batch 16 a head's step is mostly memory traffic: its first kernel (2048 x
1024, 8 MiB) and Adam's two moments of it are read and written every step, and TensorFlow
runs the gradient (one matmul writing an 8 MiB gradient) and the update (reading it back)
as two passes. Here one parallel loop over the kernel's rows computes each row's gradient
(the batch's outer product, in a buffer that stays in L1) and applies Adam to it at once,
so kernel and moments cross memory once per step and the gradient never does. Every
loop is blocked four by four (four batch rows with four kernel rows), so each value
loaded feeds four products (the step 1.6x as fast as a row at a time, with its kernel in
cache, measured here); the forward pass streams contiguous runs of kernel rows, and
the step can form the next batch's forward pass through each updated row while it is in
cache (a first layer's kernel then crosses memory once per step, not twice).

The update is Keras' Adam.update_step term for term in float32, with the learning rate
already scaled by the bias corrections as Keras forms it, and every kernel flushes
subnormals to zero as TensorFlow's threads do (model/denormals.py: without it, moments
decaying into the subnormal range made a step 2.6x as slow on an Intel Xeon). Two things
move results in the last float32 digits: a multiply followed by an add is one fused
multiply-add (fastmath "contract": one rounding where TensorFlow's elementwise Adam
rounds twice; oneDNN's matmuls fuse them too; a seed's step on the real lite0 features
2.52 -> 2.29 ms, measured here), and sums run in other orders than a matmul's (the batch
four rows at a time, the input gradient reassociated into SIMD lanes).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ecg_mlflow.model.denormals import flush_subnormals, restore_float_mode


FORWARD_CHUNKS = 8  # tasks of dense_forward and dense_step: runs of the kernel's rows, each with its own sums


@njit(parallel=True, cache=True, fastmath={"contract"})
def dense_forward(inputs, kernel, bias, out):
    """out = inputs @ kernel + bias, [B, I] x [I, J] -> [B, J]. The kernel's rows are cut
    into FORWARD_CHUNKS contiguous chunks, one task each, streamed in order four rows at a
    time into four batch rows' sums at once (every kernel value loaded feeds four sums,
    every sum loaded takes four products); the chunks' partial sums are then added in
    chunk order (`sum_chunks`), so the result does not depend on the threads. Contiguous
    rows stream from memory at full speed where column blocks of every row did not (0.84
    vs 1.33 ms for 16 x 2048 x 1024 with the kernel out of cache, measured here)."""
    batch, n_in = inputs.shape
    n_out = kernel.shape[1]
    per_chunk = _rows_per_chunk(n_in)
    partial = np.zeros((FORWARD_CHUNKS, batch, n_out), np.float32)
    for chunk in prange(FORWARD_CHUNKS):
        saved = flush_subnormals()
        sums = partial[chunk]
        start = chunk * per_chunk
        stop = min(n_in, start + per_chunk)
        for first in range(start, stop, 4):
            _add_rows(inputs, kernel, first, min(4, stop - first), sums)
        restore_float_mode(saved)
    sum_chunks(partial, bias, out)


@njit(parallel=True, cache=True)
def sum_chunks(partial, bias, out):
    """out = the chunks' partial sums added in chunk order, plus the bias."""
    n_chunks, batch, n_out = partial.shape
    for k in prange(batch):
        saved = flush_subnormals()
        for j in range(n_out):
            total = partial[0, k, j]
            for chunk in range(1, n_chunks):
                total += partial[chunk, k, j]
            out[k, j] = total + bias[j]
        restore_float_mode(saved)


@njit(cache=True, inline="always")
def _rows_per_chunk(n_in):
    """Rows of each of the FORWARD_CHUNKS chunks: a multiple of four (the last may be short)."""
    return ((n_in + 3) // 4 + FORWARD_CHUNKS - 1) // FORWARD_CHUNKS * 4


@njit(cache=True, inline="always")
def _add_rows(inputs, kernel, first, rows, sums):
    """sums += inputs[:, first:first + rows] @ kernel[first:first + rows], rows <= 4: four
    kernel rows into four batch rows' sums at once, leftover batch rows and kernel rows
    one at a time."""
    batch, n_out = sums.shape
    i = first
    if rows == 4:
        r0, r1, r2, r3 = kernel[i], kernel[i + 1], kernel[i + 2], kernel[i + 3]
        k = 0
        while k + 4 <= batch:
            a0, a1, a2, a3 = inputs[k, i], inputs[k, i + 1], inputs[k, i + 2], inputs[k, i + 3]
            b0, b1, b2, b3 = inputs[k + 1, i], inputs[k + 1, i + 1], inputs[k + 1, i + 2], inputs[k + 1, i + 3]
            c0, c1, c2, c3 = inputs[k + 2, i], inputs[k + 2, i + 1], inputs[k + 2, i + 2], inputs[k + 2, i + 3]
            d0, d1, d2, d3 = inputs[k + 3, i], inputs[k + 3, i + 1], inputs[k + 3, i + 2], inputs[k + 3, i + 3]
            s0, s1, s2, s3 = sums[k], sums[k + 1], sums[k + 2], sums[k + 3]
            for j in range(n_out):
                w0, w1, w2, w3 = r0[j], r1[j], r2[j], r3[j]
                s0[j] += a0 * w0 + a1 * w1 + a2 * w2 + a3 * w3
                s1[j] += b0 * w0 + b1 * w1 + b2 * w2 + b3 * w3
                s2[j] += c0 * w0 + c1 * w1 + c2 * w2 + c3 * w3
                s3[j] += d0 * w0 + d1 * w1 + d2 * w2 + d3 * w3
            k += 4
        for k in range(k, batch):
            a0, a1, a2, a3 = inputs[k, i], inputs[k, i + 1], inputs[k, i + 2], inputs[k, i + 3]
            row = sums[k]
            for j in range(n_out):
                row[j] += a0 * r0[j] + a1 * r1[j] + a2 * r2[j] + a3 * r3[j]
    else:
        for i in range(first, first + rows):
            r0 = kernel[i]
            for k in range(batch):
                a0, row = inputs[k, i], sums[k]
                for j in range(n_out):
                    row[j] += a0 * r0[j]


@njit(parallel=True, cache=True, fastmath={"contract"})
def dense_step(inputs_t, output_grad, kernel, m, v, alpha, one_minus_beta_1, one_minus_beta_2, epsilon,
               backwards=False, next_inputs=None, next_partial=None):
    """kernel -= Adam(inputs_t.T @ output_grad), moments included, in place; given the
    next step's inputs, also that step's forward pass through the updated kernel.

    inputs_t: [I, B] the layer's inputs, transposed (contiguous per input unit);
    output_grad: [B, J] the loss' gradient at the layer's pre-activation;
    kernel, m, v: [I, J] float32;
    the scalars float32 (alpha = lr * sqrt(1 - b2^t) / (1 - b1^t), as Keras forms it).
    The rows are cut into dense_forward's chunks, one task each. Per four rows the task
    forms their gradients at once (every gradient value loaded feeds four rows), then
    applies Adam to them. A row's gradient sums the batch four rows at a time, in the same
    order whether its row is one of four or alone.
    backwards: visit the chunks last to first. Rows are independent, so the result is the
    same either way; alternating directions step by step starts each step on rows the
    last one touched last, the likeliest still in cache.
    next_inputs [B', I], next_partial [FORWARD_CHUNKS, B', J]: each chunk's updated rows
    go on into next_inputs' forward sums while they are in cache, as dense_forward forms
    them: `sum_chunks(next_partial, updated bias, out)` is then bit for bit
    dense_forward(next_inputs, kernel, updated bias, out), without reading the kernel
    from memory again (a first layer's kernel is most of a step's traffic).
    """
    n_in, n_out = kernel.shape
    per_chunk = _rows_per_chunk(n_in)
    for task in prange(FORWARD_CHUNKS):
        saved = flush_subnormals()
        chunk = np.int64(task)  # prange's index is unsigned
        if backwards:
            chunk = FORWARD_CHUNKS - 1 - chunk
        start = chunk * per_chunk
        stop = min(n_in, start + per_chunk)
        gradient = np.empty((4, n_out), np.float32)
        if next_partial is not None:
            next_partial[chunk] = 0
        for first in range(start, stop, 4):
            rows = min(4, stop - first)
            gradient[:] = 0
            if rows == 4:
                _four_row_gradients(inputs_t, first, output_grad, gradient)
            else:
                for r in range(rows):
                    _row_gradient(inputs_t[first + r], 0, output_grad, gradient[r])
            for r in range(rows):
                i = first + r
                _adam_update(gradient[r], kernel[i], m[i], v[i], alpha, one_minus_beta_1, one_minus_beta_2, epsilon)
            if next_inputs is not None:
                _add_rows(next_inputs, kernel, first, rows, next_partial[chunk])
        restore_float_mode(saved)


@njit(cache=True, inline="always")
def _four_row_gradients(inputs_t, first, output_grad, gradient):
    """gradient[r] = inputs_t[first + r] @ output_grad for r < 4, the batch four at a time."""
    batch, n_out = output_grad.shape
    q0, q1, q2, q3 = gradient[0], gradient[1], gradient[2], gradient[3]
    xa, xb, xc, xd = inputs_t[first], inputs_t[first + 1], inputs_t[first + 2], inputs_t[first + 3]
    k = 0
    while k + 4 <= batch:
        a0, a1, a2, a3 = xa[k], xa[k + 1], xa[k + 2], xa[k + 3]
        b0, b1, b2, b3 = xb[k], xb[k + 1], xb[k + 2], xb[k + 3]
        c0, c1, c2, c3 = xc[k], xc[k + 1], xc[k + 2], xc[k + 3]
        d0, d1, d2, d3 = xd[k], xd[k + 1], xd[k + 2], xd[k + 3]
        g0, g1, g2, g3 = output_grad[k], output_grad[k + 1], output_grad[k + 2], output_grad[k + 3]
        for j in range(n_out):
            e0, e1, e2, e3 = g0[j], g1[j], g2[j], g3[j]
            q0[j] += a0 * e0 + a1 * e1 + a2 * e2 + a3 * e3
            q1[j] += b0 * e0 + b1 * e1 + b2 * e2 + b3 * e3
            q2[j] += c0 * e0 + c1 * e1 + c2 * e2 + c3 * e3
            q3[j] += d0 * e0 + d1 * e1 + d2 * e2 + d3 * e3
        k += 4
    for r in range(4):
        _row_gradient(inputs_t[first + r], k, output_grad, gradient[r])


@njit(cache=True, inline="always")
def _row_gradient(inputs_row, k, output_grad, gradient):
    """gradient += inputs_row[k:] @ output_grad[k:], the batch four rows at a time."""
    batch, n_out = output_grad.shape
    while k + 4 <= batch:
        x0, x1, x2, x3 = inputs_row[k], inputs_row[k + 1], inputs_row[k + 2], inputs_row[k + 3]
        g0, g1, g2, g3 = output_grad[k], output_grad[k + 1], output_grad[k + 2], output_grad[k + 3]
        for j in range(n_out):
            gradient[j] += x0 * g0[j] + x1 * g1[j] + x2 * g2[j] + x3 * g3[j]
        k += 4
    for k in range(k, batch):
        x0, g0 = inputs_row[k], output_grad[k]
        for j in range(n_out):
            gradient[j] += x0 * g0[j]


@njit(cache=True, inline="always")
def _adam_update(gradient, weights, m, v, alpha, one_minus_beta_1, one_minus_beta_2, epsilon):
    """Keras' Adam.update_step on one row of a kernel (or on a bias), in place."""
    for j in range(weights.shape[0]):
        g = gradient[j]
        m_j = m[j] + (g - m[j]) * one_minus_beta_1
        v_j = v[j] + (g * g - v[j]) * one_minus_beta_2
        m[j] = m_j
        v[j] = v_j
        weights[j] -= (m_j * alpha) / (np.sqrt(v_j) + epsilon)


@njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
def input_gradient(output_grad, kernel, out):
    """out = output_grad @ kernel.T, [B, J] x [J, I] -> [B, I]: the gradient the layer
    below needs (taken before the kernel's update). Each entry is a dot product along a
    kernel row, summed in SIMD lanes (reassociated: only here), four kernel rows with four
    batch rows at once: every value loaded feeds four products, where a dot product at a
    time loaded two values per product (a 1024 x 512 layer's 0.43-0.52 -> 0.18-0.20 ms
    on an AMD EPYC, measured here)."""
    n_in, n_out = kernel.shape
    batch = output_grad.shape[0]
    for block in prange((n_in + 3) // 4):
        saved = flush_subnormals()
        first = 4 * block
        k = 0
        if first + 4 <= n_in:
            while k + 4 <= batch:
                _four_by_four_dots(output_grad, kernel, k, first, out)
                k += 4
        for i in range(first, min(n_in, first + 4)):
            for row in range(k, batch):  # what the blocks left: all rows of a short block
                total = np.float32(0)
                for j in range(n_out):
                    total += output_grad[row, j] * kernel[i, j]
                out[row, i] = total
        restore_float_mode(saved)


@njit(cache=True, inline="always")
def _four_by_four_dots(output_grad, kernel, k, i, out):
    """out[k:k + 4, i:i + 4] = output_grad[k:k + 4] @ kernel[i:i + 4].T, sixteen sums in one
    pass along the rows."""
    r0, r1, r2, r3 = kernel[i], kernel[i + 1], kernel[i + 2], kernel[i + 3]
    g0, g1, g2, g3 = output_grad[k], output_grad[k + 1], output_grad[k + 2], output_grad[k + 3]
    t00 = t01 = t02 = t03 = t10 = t11 = t12 = t13 = np.float32(0)
    t20 = t21 = t22 = t23 = t30 = t31 = t32 = t33 = np.float32(0)
    for j in range(kernel.shape[1]):
        w0, w1, w2, w3 = r0[j], r1[j], r2[j], r3[j]
        e0, e1, e2, e3 = g0[j], g1[j], g2[j], g3[j]
        t00, t01, t02, t03 = t00 + e0 * w0, t01 + e0 * w1, t02 + e0 * w2, t03 + e0 * w3
        t10, t11, t12, t13 = t10 + e1 * w0, t11 + e1 * w1, t12 + e1 * w2, t13 + e1 * w3
        t20, t21, t22, t23 = t20 + e2 * w0, t21 + e2 * w1, t22 + e2 * w2, t23 + e2 * w3
        t30, t31, t32, t33 = t30 + e3 * w0, t31 + e3 * w1, t32 + e3 * w2, t33 + e3 * w3
    out[k, i], out[k, i + 1], out[k, i + 2], out[k, i + 3] = t00, t01, t02, t03
    out[k + 1, i], out[k + 1, i + 1], out[k + 1, i + 2], out[k + 1, i + 3] = t10, t11, t12, t13
    out[k + 2, i], out[k + 2, i + 1], out[k + 2, i + 2], out[k + 2, i + 3] = t20, t21, t22, t23
    out[k + 3, i], out[k + 3, i + 1], out[k + 3, i + 2], out[k + 3, i + 3] = t30, t31, t32, t33


@njit(cache=True)
def bias_step(output_grad, bias, m, v, alpha, one_minus_beta_1, one_minus_beta_2, epsilon):
    """bias -= Adam(output_grad summed over the batch), in place."""
    batch, n_out = output_grad.shape
    saved = flush_subnormals()
    gradient = output_grad[0].copy()
    for k in range(1, batch):
        for j in range(n_out):
            gradient[j] += output_grad[k, j]
    _adam_update(gradient, bias, m, v, alpha, one_minus_beta_1, one_minus_beta_2, epsilon)
    restore_float_mode(saved)
