"""A head's training step in Numba: forward pass, input gradient, and Keras' Adam step of
each dense layer fused with the layer's weight gradient (model/seed_heads.py runs them).

At batch 16 a head's step is bound by memory, not arithmetic: its first kernel (2048 x
1024, 8 MiB) and Adam's two moments of it are read and written every step, and TensorFlow
runs the gradient (one matmul writing an 8 MiB gradient) and the update (reading it back)
as two passes. Here one parallel loop over the kernel's rows computes each row's gradient
(the batch's outer product, in a buffer that stays in L1) and applies Adam to it at once,
so kernel and moments cross memory once per step and the gradient never does.

The update is Keras' Adam.update_step term for term in float32, with the learning rate
already scaled by the bias corrections as Keras forms it. Sums run in other orders than
a matmul's (the batch four rows at a time, the input gradient reassociated into SIMD
lanes: fast-math there only), which moves results in the last float32 digits.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


FORWARD_BLOCK = 128  # output units per task of dense_forward (16 x 128 sums: 8 KiB, in L1)


@njit(parallel=True, cache=True)
def dense_forward(inputs, kernel, bias, out):
    """out = inputs @ kernel + bias, [B, I] x [I, J] -> [B, J]. Each task owns a block of
    output units and streams the kernel's rows through it four at a time, so the sums
    are loaded and stored a quarter as often as the kernel is read."""
    batch, n_in = inputs.shape
    n_out = kernel.shape[1]
    for block in prange((n_out + FORWARD_BLOCK - 1) // FORWARD_BLOCK):
        start = block * FORWARD_BLOCK
        stop = min(start + FORWARD_BLOCK, n_out)
        sums = np.zeros((batch, stop - start), np.float32)
        i = 0
        while i + 4 <= n_in:
            r0, r1 = kernel[i, start:stop], kernel[i + 1, start:stop]
            r2, r3 = kernel[i + 2, start:stop], kernel[i + 3, start:stop]
            for k in range(batch):
                a0, a1, a2, a3 = inputs[k, i], inputs[k, i + 1], inputs[k, i + 2], inputs[k, i + 3]
                row = sums[k]
                for j in range(stop - start):
                    row[j] += a0 * r0[j] + a1 * r1[j] + a2 * r2[j] + a3 * r3[j]
            i += 4
        for i in range(i, n_in):
            r0 = kernel[i, start:stop]
            for k in range(batch):
                a0, row = inputs[k, i], sums[k]
                for j in range(stop - start):
                    row[j] += a0 * r0[j]
        for k in range(batch):
            for j in range(stop - start):
                out[k, start + j] = sums[k, j] + bias[start + j]


@njit(parallel=True, cache=True)
def dense_step(inputs_t, output_grad, kernel, m, v, alpha, one_minus_beta_1, one_minus_beta_2, epsilon):
    """kernel -= Adam(inputs_t.T @ output_grad), moments included, in place.

    inputs_t: [I, B] the layer's inputs, transposed (contiguous per input unit);
    output_grad: [B, J] the loss' gradient at the layer's pre-activation;
    kernel, m, v: [I, J] float32;
    the scalars float32 (alpha = lr * sqrt(1 - b2^t) / (1 - b1^t), as Keras forms it).
    A row's gradient sums the batch four rows at a time.
    """
    n_in, n_out = kernel.shape
    batch = output_grad.shape[0]
    for i in prange(n_in):
        gradient = np.zeros(n_out, np.float32)
        k = 0
        while k + 4 <= batch:
            x0, x1, x2, x3 = inputs_t[i, k], inputs_t[i, k + 1], inputs_t[i, k + 2], inputs_t[i, k + 3]
            g0, g1, g2, g3 = output_grad[k], output_grad[k + 1], output_grad[k + 2], output_grad[k + 3]
            for j in range(n_out):
                gradient[j] += x0 * g0[j] + x1 * g1[j] + x2 * g2[j] + x3 * g3[j]
            k += 4
        for k in range(k, batch):
            x0, g0 = inputs_t[i, k], output_grad[k]
            for j in range(n_out):
                gradient[j] += x0 * g0[j]
        for j in range(n_out):
            g = gradient[j]
            m_ij = m[i, j] + (g - m[i, j]) * one_minus_beta_1
            v_ij = v[i, j] + (g * g - v[i, j]) * one_minus_beta_2
            m[i, j] = m_ij
            v[i, j] = v_ij
            kernel[i, j] -= (m_ij * alpha) / (np.sqrt(v_ij) + epsilon)


@njit(parallel=True, cache=True, fastmath={"reassoc"})
def input_gradient(output_grad, kernel, out):
    """out = output_grad @ kernel.T, [B, J] x [J, I] -> [B, I]: the gradient the layer
    below needs (taken before the kernel's update). Each entry is a dot product along a
    kernel row, summed in SIMD lanes (reassociated: only here)."""
    n_in, n_out = kernel.shape
    batch = output_grad.shape[0]
    for i in prange(n_in):
        for k in range(batch):
            total = np.float32(0)
            for j in range(n_out):
                total += output_grad[k, j] * kernel[i, j]
            out[k, i] = total


@njit(cache=True)
def bias_step(output_grad, bias, m, v, alpha, one_minus_beta_1, one_minus_beta_2, epsilon):
    """bias -= Adam(output_grad summed over the batch), in place."""
    batch, n_out = output_grad.shape
    for j in range(n_out):
        g = output_grad[0, j]
        for k in range(1, batch):
            g += output_grad[k, j]
        m_j = m[j] + (g - m[j]) * one_minus_beta_1
        v_j = v[j] + (g * g - v[j]) * one_minus_beta_2
        m[j] = m_j
        v[j] = v_j
        bias[j] -= (m_j * alpha) / (np.sqrt(v_j) + epsilon)
